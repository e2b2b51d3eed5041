"""`moekit run chen2022` in quick mode: sane bands, required rows/metrics/plots, same seed → same numbers.

Legend: R runs (seeds).
"""
import pytest

from moekit.experiments.base import ExperimentResult, make_context
from moekit.experiments.chen2022 import EXPERIMENT, MODELS


def make_ctx(tmp_path, seeds=2, quick=True, argv=()):
    return make_context(EXPERIMENT, tmp_path, argv, seeds=seeds, quick=quick)


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
    assert res.mean("MoE cubic", "entropy") < 0.3 < 1.0 < res.mean("MoE linear", "entropy") <= 1.3863
    assert res.mean("single cubic", "train_acc") > res.mean("single linear", "train_acc")
    assert set(ctx.figures) == {"routing_linear_moe.png", "routing_cubic_moe.png", "loss_single.png", "loss_moe.png"}
    assert all((tmp_path / "a" / f).exists() for f in ctx.figures)
    assert len(res.tables) == 2 and all(t.startswith("| expert |") for t in res.tables.values())
    assert res.config["quick"] and res.config["n_train"] == 2000 and res.config["seeds"] == 2


def test_same_seed_same_numbers_and_options(tmp_path):
    argv = ["--setting", "2", "--n-train", "300", "--n-test", "300", "--steps", "15", "--experts", "4"]
    a = EXPERIMENT.run(make_ctx(tmp_path / "a", argv=argv))
    b = EXPERIMENT.run(make_ctx(tmp_path / "b", argv=argv))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert a.config["sigma_p"] == 2.0 and a.config["moe_steps"] == 15 and a.config["single_steps"] == 15
    assert a.paper == []  # M = 4 is not the paper's configuration
    c = EXPERIMENT.run(make_ctx(tmp_path / "c", argv=argv + ["--data-seed", "1"]))
    assert [r.metrics for r in c.rows] != [r.metrics for r in a.rows]


def test_bad_setting(tmp_path):
    ctx = make_ctx(tmp_path)
    ctx.args.setting = 3
    with pytest.raises(ValueError, match="setting"):
        EXPERIMENT.run(ctx)


@pytest.mark.parametrize("argv, flag", [(["--n-train", "-5"], "--n-train"), (["--experts", "0"], "--experts"),
                                        (["--sigma-p", "-1"], "--sigma-p"), (["--steps", "0"], "--steps")])
def test_bad_options_name_the_flag(tmp_path, argv, flag):
    with pytest.raises(ValueError, match=flag):
        EXPERIMENT.run(make_ctx(tmp_path, argv=argv))
