"""`moekit run load-balance` in quick mode: sane bands, plots, determinism, option errors.

Legend: E experts, k experts per example.
"""

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

from moekit.repro.experiments.base import ExperimentResult, make_context  # noqa: E402
from moekit.repro.experiments.load_balance import EXPERIMENT, setting_name  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def _ctx(out_dir, seeds=1, quick=True, argv=()):
    return make_context(EXPERIMENT, out_dir, argv, seeds=seeds, quick=quick)


QUICK_SEEDS = 2      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def _metric(result: ExperimentResult, wi, wl, name):
    return result.mean(setting_name(wi, wl), name)


def test_contract_and_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "load-balance"
    assert [r.name for r in res.rows] == ["w_imp=0, w_load=0", "w_imp=0.1, w_load=0", "w_imp=0, w_load=0.1",
                                          "w_imp=0.1, w_load=0.1"]
    for r in res.rows:
        assert set(r.metrics) >= {"test_acc", "cv_importance", "cv_load", "max_over_mean_load", "experts_used"}
        assert all(len(v) == QUICK_SEEDS for v in r.metrics.values())       # one value per seed
    assert {p.name for p in res.paper} == {"w_imp=0, w_load=0", "w_imp=0.1, w_load=0.1"}
    assert set(ctx.figures) == {"load_over_training.png", "cv_load_curves.png", "cv_importance_curves.png"}
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000
    assert res.notes and res.tables and res.config["steps"] == 120


def test_sane_bands(quick_run):
    _, res = quick_run
    for wi, wl in [(0, 0), (0.1, 0), (0, 0.1), (0.1, 0.1)]:
        assert _metric(res, wi, wl, "test_acc") > 85.0             # digits is easy; MoE must not break it
    # Without balancing losses the zero-initialised router collapses onto a few experts ...
    none_cv = _metric(res, 0, 0, "cv_load")
    assert none_cv > 0.8 and _metric(res, 0, 0, "max_over_mean_load") > 2.5
    assert _metric(res, 0, 0, "experts_used") < 16
    # ... and each loss (alone or both) keeps every expert busy and CV(load) far lower.
    for wi, wl in [(0.1, 0), (0, 0.1), (0.1, 0.1)]:
        assert _metric(res, wi, wl, "cv_load") < 0.5 * none_cv
        assert _metric(res, wi, wl, "cv_importance") < 0.6
        assert _metric(res, wi, wl, "experts_used") >= 15       # a rare expert may miss the small test set
        assert _metric(res, wi, wl, "train_cv_load") < 0.3        # on the batch the losses act on
    # Ceiling for E=16, k=2: CV(load) ≤ sqrt(E/k − 1) = sqrt(7), max/mean ≤ E/k = 8.
    assert none_cv <= 7 ** 0.5 + 1e-6 and _metric(res, 0, 0, "max_over_mean_load") <= 8 + 1e-6


def test_deterministic_and_leaves_global_rng_alone(tmp_path):
    argv = ["--steps", "15", "--grid", "core"]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = EXPERIMENT.run(_ctx(tmp_path / "a", seeds=2, argv=argv))
    assert torch.equal(torch.get_rng_state(), before)
    b = EXPERIMENT.run(_ctx(tmp_path / "b", seeds=2, argv=argv))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    # Two seeds give two different runs.
    assert any(r.metrics["cv_importance"][0] != r.metrics["cv_importance"][1] for r in a.rows)


@pytest.mark.parametrize("argv, match", [(["--batch-size", "-1"], "--batch-size"), (["--steps", "0"], "--steps"),
                                         (["--top-k", "20"], "--top-k"), (["--lr", "0"], "--lr"),
                                         (["--lr", "inf"], "--lr: must be a finite"),
                                         (["--num-experts", "0"], "--num-experts")])
def test_bad_options(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        _ctx(tmp_path, argv=argv)


def test_verdicts(quick_run):
    _, res = quick_run
    assert len(res.verdicts) == 2           # the core grid has no single-loss (0.2) settings
    balance, quality = res.verdicts
    assert balance.verdict in ("reproduced", "partly") and "CV(load)" in balance.reason
    assert "test accuracy" in quality.reason
