"""`moekit run chen2022`: the official training recipes on the shared loop (equal to separate plain runs),
the loss by hand, and the quick run: sane bands, rows/metrics/plots, verdicts, same seed → same numbers.

Legend: R runs (seeds), N examples, P patches, D patch dim, M experts, C classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.repro.experiments.base import ExperimentResult, make_context
from moekit.repro.experiments.chen2022 import (EXPERIMENT, MODELS, accuracy_R, moe_loss_R, single_loss_R, train_moe,
                                         train_single)
from moekit.repro.experiments.options import OptionError
from moekit.repro.models.chen2022 import ChenMoE, ChenSingle

from chen_reference import RefMoE, conv_expert, gen, make_conv, tiny

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def ref_normalized_gd(expert_modules, lr):
    with torch.no_grad():
        for e in expert_modules:
            norm = sum(p.grad.norm() for p in e.parameters())
            for p in e.parameters():
                if norm != 0:
                    p.grad /= norm
                p -= lr * p.grad


# ------------------------------------------------------------------------------- training recipes
@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_moe_training_equals_separate_runs(activation):
    """train_moe on R runs == R separate official-style runs (same init, same noise stream)."""
    d = tiny(n=32)
    R, M, steps, lr_e, lr_r = 3, 3, 6, 1e-3, 0.1
    moe = ChenMoE(R, dim=6, num_experts=M, filters_per_class=2, activation=activation,
                  generators=[gen(s) for s in range(R)]).double()
    refs = [RefMoE(moe, r) for r in range(R)]
    train_moe(moe, d, steps=steps, expert_lr=lr_e, router_lr=lr_r, generators=[gen(100 + r) for r in range(R)],
              early_stop=False)
    for r, ref in enumerate(refs):
        g = gen(100 + r)
        opt = torch.optim.SGD(ref.router.parameters(), lr=lr_r)
        for _ in range(steps):
            ref.zero_grad()
            y, _ = ref(d.x_NPD, torch.rand(len(d), M, generator=g).double())
            loss = F.cross_entropy(torch.softmax(y, 1), d.y_N)   # the official double softmax
            loss.backward()
            ref_normalized_gd(ref.experts, lr_e)
            opt.step()
        for m, e in enumerate(ref.experts):
            torch.testing.assert_close(moe.expert_w_RMFD[r, m].detach(), e.weight[:, 0].detach())
            torch.testing.assert_close(moe.expert_b_RMF[r, m].detach(), e.bias.detach())
        torch.testing.assert_close(moe.router_w_RMD[r].detach(), ref.router.weight[:, 0].detach())
    assert moe.router_w_RMD.abs().sum() > 0  # the router did move


@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_single_training_equals_separate_adam_runs(activation):
    d = tiny(n=20)
    R, steps = 2, 4
    m = ChenSingle(R, dim=6, filters_per_class=3, activation=activation, generators=[gen(s) for s in range(R)]).double()
    convs = [make_conv(m.w_RFD[r].detach(), m.b_RF[r].detach()) for r in range(R)]
    train_single(m, d, steps=steps, lr=0.01, early_stop=False)
    for r, conv in enumerate(convs):
        opt = torch.optim.Adam(conv.parameters(), lr=0.01, weight_decay=5e-4)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(conv_expert(d.x_NPD, conv, activation, 3), d.y_N).backward()
            opt.step()
        torch.testing.assert_close(m.w_RFD[r].detach(), conv.weight[:, 0].detach())
        torch.testing.assert_close(m.b_RF[r].detach(), conv.bias.detach())


def test_moe_loss_hand_values():
    y = torch.tensor([0, 1])
    # F = 0 → softmax (½, ½) → CE of (½, ½) = ln 2; F = (+100, −100) for class 0 → p ≈ (1, 0) → log(1 + 1/e)
    out = torch.tensor([[[0.0, 0.0], [-100.0, 100.0]]])
    loss = moe_loss_R(out, y)
    torch.testing.assert_close(loss, torch.tensor([(math.log(2) + math.log(1 + math.exp(-1))) / 2]))
    torch.testing.assert_close(single_loss_R(out[:, :1], y[:1]), torch.tensor([math.log(2)]))
    # example 0 predicts class 0 (wrong for y = 1), example 1 class 1 (right)
    assert accuracy_R(torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]]), torch.tensor([1, 1])).tolist() == [50.0]


def test_train_moe_logs_and_stops():
    d = tiny(n=32, dtype=torch.float32)
    moe = ChenMoE(2, dim=6, num_experts=3, filters_per_class=2, generators=[gen(0), gen(1)])
    log = train_moe(moe, d, steps=30, generators=[gen(2), gen(3)])
    assert log.losses.shape == (2, 30)
    assert (log.steps <= 30).all() and (log.steps >= 1).all()
    for r in range(2):          # finite up to the stop, NaN after it
        stop = log.stopped_at[r].item()
        last = 30 if stop < 0 else stop + 1
        assert torch.isfinite(log.losses[r, :last]).all() and torch.isnan(log.losses[r, last:]).all()
        assert stop < 0 or log.steps[r].item() == stop
    assert abs(log.losses[0, 0].item() - math.log(2)) < 1e-3  # tiny experts: F ≈ 0 → loss ≈ ln 2


# ------------------------------------------------------------------------------- the experiment


def make_ctx(tmp_path, seeds=2, quick=True, argv=(), **options):
    return make_context(EXPERIMENT, tmp_path, argv, seeds=seeds, quick=quick, **options)


def test_quick_run_sane_bands(tmp_path):
    ctx = make_ctx(tmp_path / "a")
    res = EXPERIMENT.run(ctx)
    assert isinstance(res, ExperimentResult)
    assert [r.name for r in res.rows] == list(MODELS)
    assert [r.name for r in res.paper] == list(MODELS)  # setting 1 at the paper's sizes → paper rows
    for r in res.rows:
        assert len(r.metrics["test_acc"]) == 2  # two seeds in quick mode
        assert ("entropy" in r.metrics) == r.name.startswith("MoE")
    # the paper's ordering, in bands that hold at n = 2000 (measured: single linear ≈ 69 %, MoE linear ≈ 92 %,
    # MoE cubic ≈ 100 % with entropy ≈ 0, MoE linear entropy ≈ 1.3; the cubic single overfits at this n)
    assert 60 < res.mean("single linear", "test_acc") < 75
    assert res.mean("MoE cubic", "test_acc") > 95
    accs = [res.mean(name, "test_acc") for name in ("MoE cubic", "MoE linear", "single linear")]
    assert accs[0] > accs[1] > accs[2]
    # (two seeds of a 300-step quick run: one cubic seed may still share a cluster between two experts)
    assert res.mean("MoE cubic", "entropy") < 0.6 < 1.0 < res.mean("MoE linear", "entropy") <= 1.3863
    assert res.mean("single cubic", "train_acc") > res.mean("single linear", "train_acc")
    assert set(ctx.figures) == {"routing_linear_moe.png", "routing_cubic_moe.png", "loss_single.png", "loss_moe.png"}
    assert all((tmp_path / "a" / f).exists() for f in ctx.figures)
    assert len(res.tables) == 2 and all(t.startswith("| expert |") for t in res.tables.values())
    assert all("| 0 |" in t for t in res.tables.values())            # experts numbered from 0
    assert res.config["quick"] and res.config["n_train"] == 2000 and res.config["seeds"] == 2
    assert all(r.source is not None and r.source.status == "code" for r in res.paper)
    assert len(res.verdicts) == 4
    assert res.verdicts[0].verdict == "reproduced" and res.verdicts[3].verdict in ("reproduced", "partly")


def test_same_seed_same_numbers_and_options(tmp_path):
    argv = ["--setting", "2", "--n-train", "300", "--n-test", "300", "--steps", "15", "--experts", "4"]
    a = EXPERIMENT.run(make_ctx(tmp_path / "a", argv=argv))
    b = EXPERIMENT.run(make_ctx(tmp_path / "b", argv=argv))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert a.config["sigma_p"] == 2.0 and a.config["moe_steps"] == 15 and a.config["single_steps"] == 15
    assert a.paper == []  # M = 4 is not the paper's configuration
    c = EXPERIMENT.run(make_ctx(tmp_path / "c", argv=argv + ["--data-seed", "1"]))
    assert [r.metrics for r in c.rows] != [r.metrics for r in a.rows]


@pytest.mark.parametrize("argv, flag", [(["--n-train", "-5"], "--n-train"), (["--experts", "0"], "--experts"),
                                        (["--sigma-p", "-1"], "--sigma-p"), (["--steps", "0"], "--steps"),
                                        (["--sigma-p", "nan"], "--sigma-p"), (["--clusters", "30"], "--clusters"),
                                        (["--patches", "2"], "--patches")])
def test_bad_options_name_the_flag(tmp_path, argv, flag):
    with pytest.raises(OptionError, match=flag):
        make_ctx(tmp_path, argv=argv)
    with pytest.raises(OptionError, match="--setting"):
        make_ctx(tmp_path, setting=3)
