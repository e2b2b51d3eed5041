"""`moekit run sparse-mlp` in quick mode: contract, sane bands, matched active parameters, plots, determinism,
option errors.

Legend: E experts, R seeds.
"""
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from moekit.repro.experiments import sparse_mlp as sm  # noqa: E402
from moekit.repro.experiments.base import make_context  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.sparse_mlp import EXPERIMENT  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def _ctx(out_dir, seeds=1, quick=True, argv=()):
    return make_context(EXPERIMENT, out_dir, argv, seeds=seeds, quick=quick)


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_contract_and_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "sparse-mlp" and EXPERIMENT.default_seeds >= 1
    assert [r.name for r in res.rows] == [sm.DENSE_MATCHED, sm.SPARSE]       # quick: the matched comparison only
    for r in res.rows:
        assert {"test_acc", "active_params", "total_params"} <= set(r.metrics)
        assert all(len(v) == 1 for v in r.metrics.values())                  # one value per seed
    sparse = {r.name: r for r in res.rows}[sm.SPARSE].metrics
    assert {"acc_gain_vs_dense", "cv_load_moe_s", "cv_load_moe_c", "train_cv_load_moe_s"} <= set(sparse)
    assert [p.name for p in res.paper] == [sm.PAPER_ROW] and "ImageNet" in sm.PAPER_ROW
    assert res.paper[0].metrics == {"acc_gain_vs_dense": 2.5}
    assert set(ctx.figures) == {"test_accuracy.png", "routing_block3_moe_s.png", "routing_block3_moe_c.png"}
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000
    assert res.notes and len(res.tables) == 1 and res.config["epochs"] == sm.QUICK_EPOCHS
    assert "block2/moe_s" in next(iter(res.tables.values()))


def test_sane_bands(quick_run):
    _, res = quick_run
    for row in (sm.DENSE_MATCHED, sm.SPARSE):
        assert 75.0 < res.mean(row, "test_acc") <= 100.0                      # digits is easy even after 4 epochs
    gain = res.mean(sm.SPARSE, "acc_gain_vs_dense")
    assert math.isclose(gain, res.mean(sm.SPARSE, "test_acc") - res.mean(sm.DENSE_MATCHED, "test_acc"), abs_tol=1e-9)
    # matched active parameters (within 2 %), while the Sparse-MLP holds far more parameters in total
    a_s, a_d = res.mean(sm.SPARSE, "active_params"), res.mean(sm.DENSE_MATCHED, "active_params")
    assert abs(a_s - a_d) / a_s < 0.02
    assert res.mean(sm.SPARSE, "total_params") > 1.8 * a_s
    assert res.mean(sm.DENSE_MATCHED, "total_params") == a_d
    # expert load: between perfect balance and total collapse onto one expert (sqrt(E - 1) = 1.73 for E = 4)
    for k in ("cv_load_moe_s", "cv_load_moe_c", "train_cv_load_moe_s", "train_cv_load_moe_c"):
        assert 0.0 < res.mean(sm.SPARSE, k) < 1.2, k


def test_matched_widths_are_closest():
    opts = sm._options(_ctx("/tmp/unused").config)
    models = sm.build_models(opts)
    from moekit.repro.models.mixer import MLPMixer, count_parameters
    with torch.device("meta"):
        target = count_parameters(MLPMixer(**models[sm.SPARSE]))["active"]
        t, c, n = sm.matched_dense_widths(opts, target)
        assert n == count_parameters(MLPMixer(**models[sm.DENSE_MATCHED]))["total"]
        for c2 in (c - 1, c + 1):                    # neighbours are no closer
            t2 = max(1, round(opts["token_hidden"] * c2 / opts["channel_hidden"]))
            kw = {**models[sm.DENSE_MATCHED], "token_hidden": t2, "channel_hidden": c2}
            assert abs(count_parameters(MLPMixer(**kw))["total"] - target) >= abs(n - target)
    assert list(models) == [sm.DENSE_SAME, sm.DENSE_MATCHED, sm.SPARSE]


def test_same_seed_same_numbers():
    opts = sm._options(_ctx("/tmp/unused", argv=["--epochs", "1", "--depth", "2", "--sparse-blocks", "1"]).config)
    x_tr, y_tr, x_te, y_te = sm._digits(0)
    data = (x_tr[:192], y_tr[:192], x_te[:100], y_te[:100])
    kw = sm.build_models(opts)[sm.SPARSE]
    a, b = (sm.train_one(kw, data, 0, opts) for _ in range(2))
    assert a["test_acc"] == b["test_acc"] and a["cv_load"] == b["cv_load"]
    assert all(torch.equal(a["expert_ids"][k], b["expert_ids"][k]) for k in a["layers"])


@pytest.mark.parametrize("argv, match", [
    (["--top-k", "5"], "--top-k"),
    (["--dim", "31"], "--dim"),
    (["--sparse-blocks", "9"], "--sparse-blocks"),
    (["--epochs", "0"], "--epochs"),
    (["--capacity-factor", "-1"], "--capacity-factor"),
    (["--lr", "0"], "--lr"),
    (["--w-load", "-0.1"], "--w-load"),
    (["--batch-priority"], "--batch-priority"),
    (["--lr", "inf"], "--lr"),
])
def test_bad_options_raise(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        _ctx(tmp_path, argv=argv)


def test_bad_choice_names_the_flag(tmp_path):
    with pytest.raises(OptionError, match="--patch-size: expected one of 1, 2, 4, 8, got 3"):
        make_context(EXPERIMENT, tmp_path, patch_size=3)


def test_verdicts(quick_run):
    _, res = quick_run
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["Sparse-MLP", "The"]
    assert "matched active" in res.verdicts[0].reason and res.paper[0].source is not None
