"""`moekit run condconv` in quick mode: contract, files, sane bands, determinism, option errors, the
validation split and the recipe selection (which must never read the test images).

Legend: E experts, K classes, T images.
"""

import pytest
import torch

pytest.importorskip("matplotlib")
pytest.importorskip("sklearn")

from moekit.repro.experiments.base import make_context, mean_std  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments import condconv  # noqa: E402
from moekit.repro.experiments.condconv import (EXPERIMENT, class_spread, class_variance_share,  # noqa: E402
                                               load_data, train_one, validation_indices)

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def _ctx(out_dir, seeds=1, quick=True, argv=()):
    return make_context(EXPERIMENT, out_dir, argv, seeds=seeds, quick=quick)


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_contract_and_files(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "condconv" and EXPERIMENT.quick_time == "<30 s"
    assert [r.name for r in res.rows] == ["1 expert (plain conv)", "CondConv 4 experts"]
    assert all(r.name.startswith("ImageNet") for r in res.paper) and len(res.paper) == 3
    assert res.paper[2].metrics["test_acc"] == 78.3 and res.paper[2].metrics["madds_M"] == 413.0
    for r in res.rows:
        assert {"test_acc", "val_acc", "train_acc", "madds_M", "madds_ratio", "test_acc_gain"} <= set(r.metrics)
        assert len(r.metrics["test_acc"]) == len(r.metrics["val_acc"]) == 1   # one value per seed
    routing_keys = {"class_var_early", "class_var_late", "class_spread_early", "class_spread_late"}
    assert routing_keys <= set(res.rows[1].metrics)
    assert res.config["experts"] == [1, 4] and res.config["quick"] is True
    # MNIST by default: 4,000 training images of which 20 % are held out for validation, 1,000 test images
    assert res.config["data"] == "mnist"
    assert (res.config["n_train"], res.config["n_val"], res.config["n_test"]) == (3200, 800, 1000)
    assert any("ImageNet" in n for n in res.notes)
    assert any("early" in t for t in res.tables) and any("late" in t for t in res.tables)
    assert any(t.startswith("Trend") for t in res.tables)
    assert {"train_loss.png", "accuracy_vs_madds.png", "routing_condconv_4_experts.png"} <= set(ctx.figures)
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000


def test_sane_bands(quick_run):
    _, res = quick_run
    base, cond = res.rows
    for r in res.rows:
        # 10 classes (chance 10 %); 3 quick epochs of the width-4 CNN on MNIST reach ≈ 90 %
        assert 50.0 < mean_std(r.metrics["test_acc"])[0] <= 100.0, r.name
        assert 50.0 < mean_std(r.metrics["val_acc"])[0] <= 100.0, r.name
    assert base.metrics["madds_ratio"] == 1.0
    assert 1.0 < cond.metrics["madds_ratio"] < 1.1                    # nearly constant MADDs
    assert cond.metrics["params_k"] > 3 * base.metrics["params_k"]     # but ~E× the conv parameters
    for key in ("class_var_early", "class_var_late", "class_spread_early", "class_spread_late"):
        assert 0.0 <= mean_std(cond.metrics[key])[0] <= 1.0


def test_class_variance_share_by_hand():
    labels = torch.tensor([0, 0, 1, 1])
    same = torch.tensor([[0.2, 0.8], [0.8, 0.2], [0.2, 0.8], [0.8, 0.2]])      # class says nothing
    assert class_variance_share(same, labels, 2) == pytest.approx(0.0)
    by_class = torch.tensor([[0.1, 0.9], [0.1, 0.9], [0.7, 0.3], [0.7, 0.3]])  # class says everything
    assert class_variance_share(by_class, labels, 2) == pytest.approx(1.0)
    mixed = torch.tensor([[0.0], [1.0], [1.0], [2.0]])   # class means 0.5, 1.5; overall 1: between 1, total 2
    assert class_variance_share(mixed, labels, 2) == pytest.approx(0.5)
    assert class_spread(same, labels, 2) == pytest.approx(0.0)
    # class means (0.1, 0.9) and (0.7, 0.3): std over 2 classes = 0.3 for both experts
    assert class_spread(by_class, labels, 2) == pytest.approx(0.3)


def test_same_seed_same_numbers(tmp_path):
    data = load_data("digits", 0, 0.2)
    data.x_train, data.y_train = data.x_train[:128], data.y_train[:128]
    ctx = _ctx(tmp_path, argv=["--epochs", "1", "--batch-size", "64", "--anneal-fraction", "0.5"])
    cfg = ctx.config
    m1, l1 = train_one(2, True, 0, data, cfg, ctx, "a")
    m2, l2 = train_one(2, True, 0, data, cfg, ctx, "b")
    m3, l3 = train_one(2, True, 1, data, cfg, ctx, "c")
    assert l1 == l2 and l1 != l3
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.equal(p1, p2)
    assert all(float(b.router.temperature) == 1.0 for b in m1.blocks)   # evaluated at τ = 1


@pytest.mark.parametrize("argv, match", [
    (["--experts", "1,x"], "experts"),
    (["--experts", "0,2"], "experts"),
    (["--experts", "2,2"], "experts"),
    (["--dynamic-experts", "1"], "dynamic-experts"),
    (["--dynamic-experts", "a"], "dynamic-experts"),
    (["--epochs", "0"], "epochs"),
    (["--width", "0"], "width"),
    (["--lr", "0"], "lr"),
    (["--anneal-fraction", "1.5"], "anneal-fraction"),
    (["--lr", "nan"], "--lr: must be a finite"),
    (["--val-fraction", "0"], "val-fraction"),
    (["--val-fraction", "1"], "val-fraction"),
    (["--select-lr", "0"], "select-lr"),
    (["--select-lr", ""], "select-lr"),
    (["--select-weight-decay", "-1"], "select-weight-decay"),
])
def test_bad_options_raise(tmp_path, argv, match):
    with pytest.raises(OptionError, match="--" + match.lstrip("-")):
        _ctx(tmp_path, argv=argv)


def test_unknown_data_set_names_the_flag(tmp_path):
    with pytest.raises(OptionError, match="--data"):
        make_context(EXPERIMENT, tmp_path, [], data="cifar")


def test_validation_indices_stratified_disjoint_and_seeded():
    y = torch.arange(10).repeat_interleave(torch.tensor([20, 30, 10, 40, 20, 20, 20, 20, 20, 20]))
    fit, val = validation_indices(y, 0.25, seed=3)
    assert set(fit.tolist()).isdisjoint(val.tolist())
    assert sorted(fit.tolist() + val.tolist()) == list(range(y.numel()))
    counts = torch.bincount(y[val], minlength=10).tolist()
    assert counts == [5, 8, 2, 10, 5, 5, 5, 5, 5, 5]                 # round(0.25 · class count), per class
    again = validation_indices(y, 0.25, seed=3)
    other = validation_indices(y, 0.25, seed=4)
    assert torch.equal(val, again[1]) and not torch.equal(val, other[1])


@pytest.mark.parametrize("name, sizes", [("digits", (1078, 269, 450, 8)), ("mnist", (3200, 800, 1000, 28))])
def test_validation_split_is_disjoint_from_train_and_test(name, sizes):
    d = load_data(name, 0, 0.2)
    assert (d.x_train.shape[0], d.x_val.shape[0], d.x_test.shape[0], d.image_size) == sizes
    assert d.x_train.shape[1:] == d.x_val.shape[1:] == d.x_test.shape[1:] == (1, sizes[3], sizes[3])
    assert set(d.fit_idx.tolist()).isdisjoint(d.val_idx.tolist())    # indices into the data set's train split
    # standardised by the training part only: its pixels have mean 0 and std 1, the others only about
    assert abs(float(d.x_train.mean())) < 1e-4 and abs(float(d.x_train.std()) - 1) < 1e-4
    if name == "mnist":   # the 5,000 images are distinct, so equal rows would be the same image
        rows = {tuple(r.tolist()) for r in d.x_val.reshape(d.x_val.shape[0], -1)}
        assert not rows & {tuple(r.tolist()) for r in d.x_train.reshape(d.x_train.shape[0], -1)}
        assert not rows & {tuple(r.tolist()) for r in d.x_test.reshape(d.x_test.shape[0], -1)}


SELECT_ARGV = ["--select", "--data", "digits", "--epochs", "1", "--select-lr", "1e-3,1e-2",
               "--select-weight-decay", "0", "--no-wide-baseline"]


def test_selection_never_reads_the_test_split(tmp_path, monkeypatch):
    res = EXPERIMENT.run(_ctx(tmp_path / "a", argv=SELECT_ARGV))
    real = condconv.load_data

    def poisoned(*args):   # same train/validation images, test images and labels replaced by garbage
        d = real(*args)
        d.x_test = torch.full_like(d.x_test, float("nan"))
        d.y_test = torch.randint(0, 10, d.y_test.shape, generator=torch.Generator().manual_seed(1))
        return d
    monkeypatch.setattr(condconv, "load_data", poisoned)
    again = EXPERIMENT.run(_ctx(tmp_path / "b", argv=SELECT_ARGV))
    # quick mode: --experts 1,4, so the candidates train the plain conv and 4 experts
    assert [r.name for r in res.rows] == ["lr 0.001, wd 0: plain conv", "lr 0.001, wd 0: CondConv 4 experts",
                                          "lr 0.01, wd 0: plain conv", "lr 0.01, wd 0: CondConv 4 experts"]
    for r, q in zip(res.rows, again.rows):
        assert set(r.metrics) == {"val_acc", "train_acc"}                  # nothing measured on test
        assert r.metrics == q.metrics
    assert (res.config["chosen_lr"], res.config["chosen_weight_decay"]) == \
        (again.config["chosen_lr"], again.config["chosen_weight_decay"])
    # the chosen candidate has the best mean validation accuracy over the plain conv and 4 experts
    val = [mean_std(r.metrics["val_acc"])[0] for r in res.rows]
    score = {lr: val[2 * i] + val[2 * i + 1] for i, lr in enumerate((1e-3, 1e-2))}
    assert res.config["chosen_lr"] == max(score, key=score.get)
    assert res.verdicts == [] and any("not used" in n for n in res.notes)
    assert any(t.startswith("Recipe selection") and "(chosen)" in v for t, v in res.tables.items())


def test_verdicts(quick_run):
    _, res = quick_run
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["Accuracy", "The", "Routing"]
    acc, cost, routing = res.verdicts
    assert "slope of the gain over log2(experts)" in acc.reason and "gain of 4 experts" in acc.reason
    assert acc.verdict == routing.verdict == "inconclusive"               # one quick seed
    assert "4 experts: MADDs / plain CNN's" in cost.reason and cost.verdict != "inconclusive"  # counted exactly
    assert all(r.source is not None for r in res.paper)


def test_accuracy_claim_needs_a_capacity_bound_regime():
    from moekit.repro.experiments.base import Row
    from moekit.repro.experiments.condconv import _verdicts

    def name(e, dyn):
        return "1 expert (plain conv)" if e == 1 else f"CondConv {e} experts"

    def rows(wide_acc):
        plain = [95.0, 95.5, 94.5]
        out = [Row(name(1, False), {"test_acc": plain, "test_acc_gain": [0.0] * 3, "madds_ratio": 1.0})]
        for e, g in ((2, 0.5), (4, 1.0), (8, 1.5)):
            out.append(Row(name(e, False), {"test_acc": [a + g for a in plain], "madds_ratio": 1.05,
                                            "test_acc_gain": [g + d for d in (0.1, -0.1, 0.0)],
                                            "class_var_early": [0.1] * 3, "class_var_late": [0.5, 0.55, 0.45]}))
        out.append(Row("plain conv, width 8", {"test_acc": wide_acc}))
        return out
    bound = _verdicts(rows([97.0, 97.5, 96.5]), [1, 2, 4, 8], name, "plain conv, width 8")
    assert [v.verdict for v in bound] == ["reproduced", "reproduced", "reproduced"]
    saturated = _verdicts(rows([95.0, 95.4, 94.6]), [1, 2, 4, 8], name, "plain conv, width 8")
    assert saturated[0].verdict == "not testable" and "twice the width" in saturated[0].reason
    assert _verdicts(rows([97.0, 97.5, 96.5]), [1, 2, 4, 8], name)[0].verdict == "inconclusive"
