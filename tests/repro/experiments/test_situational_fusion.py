"""`moekit run situational-fusion` in quick mode: contract, sane bands, fusion weights, verdicts, determinism,
option errors, and the imitation loss by hand.

Legend: B states, A actions, N views.
"""
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from moekit.repro.envs.gridnav import VIEWS  # noqa: E402
from moekit.repro.experiments.base import VERDICTS, make_context, mean_std  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.situational_fusion import EXPERIMENT, FUSED, GATED, imitation_loss  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)

MODELS = [f"single: {v}" for v in VIEWS] + list(FUSED) + list(GATED) + ["random walk", "in-sight oracle"]
ROWS = [f"{m} [8 maps]" for m in MODELS]  # quick mode trains on 8 maps


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_contract_and_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "situational-fusion"
    assert [r.name for r in res.rows] == ROWS and res.paper == []
    for r in res.rows:
        assert set(r.metrics) == {"success_unseen", "success_seen", "params"}
        assert len(r.metrics["success_unseen"]) == 1
    assert res.config["steps"] == 250 and res.config["train_maps"] == [8] and res.config["episodes"] == 256
    assert res.config["seeds"] == [0]
    assert any("recalled" in n for n in res.notes)
    assert {f"{f}_8maps.png" for f in ("success", "fusion_weights_by_situation", "fusion_weights_map", "robustness",
                                       "train_loss")} <= set(ctx.figures)
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000


def test_sane_bands(quick_run):
    _, res = quick_run
    for r in res.rows:
        v = mean_std(r.metrics["success_unseen"])[0]
        assert 0.0 <= v <= 100.0
    # a random walk of the 8 moves rarely gets within 3 steps of a goal 6-32 steps away in 39 steps
    assert res.mean("random walk [8 maps]", "success_unseen") < 15.0
    # trained on the shortest path, the best learned policy clearly beats it even after 250 quick steps
    best = max(res.mean(n, "success_unseen") for n in ROWS[:-2])
    assert best > res.mean("random walk [8 maps]", "success_unseen") + 5.0
    # the affinity rows: symmetric, ones on the diagonal, overlaps in (0, 1]
    table = next(v for k, v in res.tables.items() if k.startswith("8 training maps: data-driven view affinity"))
    vals = [[float(x) for x in ln.split("|")[2:-1]] for ln in table.splitlines()[2:]]
    A = torch.tensor(vals)
    assert A.shape == (len(VIEWS), len(VIEWS))
    torch.testing.assert_close(A, A.T, atol=0.011, rtol=0)
    assert torch.allclose(A.diagonal(), torch.ones(len(VIEWS))) and (A > 0).all()


def test_fusion_weights_by_situation_sum_to_one(quick_run):
    _, res = quick_run
    table = next(v for k, v in res.tables.items() if k.startswith("8 training maps: fusion weight per view family"))
    for ln in table.splitlines()[2:]:
        cells = ln.split("|")[3:-1]
        if "nan" in ln:
            continue
        assert sum(float(c.split("±")[0]) for c in cells) == pytest.approx(1.0, abs=0.03)


def test_verdicts(quick_run):
    _, res = quick_run
    claims = [v.claim for v in res.verdicts]
    assert len(claims) == len(set(claims)) >= 9
    assert all(v.verdict in VERDICTS and v.reason for v in res.verdicts)
    assert all(c.startswith("8 training maps: ") for c in claims)
    assert any("concat" in c for c in claims) and any("corridor" in c for c in claims)
    robust = [v for v in res.verdicts if "robust" in v.claim]
    assert len(robust) == 2 and all("frozen experts" in v.reason and "same gate" in v.reason for v in robust)
    assert any("independently trained" in c for c in claims)
    assert all(v.verdict == "inconclusive" for v in res.verdicts)   # one quick seed


def test_frozen_expert_fusion_trains_only_its_gate_and_reads_the_gate_views():
    from moekit.repro.models.navigation import GOAL_DIM, FrozenExpertFusion, GatedFeatureFusion, MLPPolicy
    torch.manual_seed(0)
    dims = [3, 4]
    experts = [MLPPolicy(dims, [0], 8), MLPPolicy(dims, [1], 8)]
    before = [p.detach().clone() for e in experts for p in e.parameters()]
    model = FrozenExpertFusion(experts, dims, 8)
    views, goal = [torch.randn(5, 3), torch.randn(5, 4)], torch.randn(5, GOAL_DIM)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=0.1)
    probs, _, w = model(views, goal)
    (-probs[:, 0].log().mean()).backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, (p for e in experts for p in e.parameters())))
    assert torch.allclose(probs.sum(-1), torch.ones(5)) and torch.allclose(w.sum(-1), torch.ones(5))
    # the expert probabilities mix with the gate's weights
    probs, _, w = model(views, goal)
    mix = w[:, :1] * experts[0](views, goal)[0] + w[:, 1:] * experts[1](views, goal)[0]
    torch.testing.assert_close(probs, mix)
    # a dropped view reaches the experts but not a gate that reads the intact views
    dropped = [torch.zeros_like(views[0]), views[1]]
    torch.testing.assert_close(model(dropped, goal, gate_views=views)[2], w)
    assert not torch.allclose(model(dropped, goal)[2], w)
    feat = GatedFeatureFusion(dims, 8)
    torch.testing.assert_close(feat(dropped, goal, gate_views=views)[2], feat(views, goal)[2])


def test_same_seed_same_numbers(tmp_path):
    argv = ["--steps", "10", "--episodes", "16", "--train-maps", "1", "2", "--test-maps", "1"]
    runs = [EXPERIMENT.run(make_context(EXPERIMENT, tmp_path / str(i), argv, seeds=1, quick=True)) for i in range(2)]
    assert [r.name for r in runs[0].rows][-1] == "in-sight oracle [2 maps]"  # one block of rows per regime
    for a, b in zip(runs[0].rows, runs[1].rows):
        assert a.metrics == b.metrics
    assert runs[0].tables == runs[1].tables


@pytest.mark.parametrize("argv,flag", [(["--steps", "0"], "--steps"), (["--map-size", "8"], "--map-size"),
                                       (["--train-maps", "0"], "--train-maps"),
                                       (["--beta", "-1"], "--beta"), (["--lr", "nan"], "--lr")])
def test_bad_options(tmp_path, argv, flag):
    with pytest.raises(OptionError, match=flag):
        make_context(EXPERIMENT, tmp_path, argv, seeds=1, quick=True)


def test_imitation_loss_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    optimal = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # −(log 0.8 + log 0.8) / 2
    assert imitation_loss(probs, optimal).item() == pytest.approx(-math.log(0.8))
