"""`moekit run deepmoe` in quick mode: sane bands, rows/metrics/plots present, same seed → same numbers, bad options.

Legend: R seeds.
"""
import pytest

from moekit.repro.experiments.base import ExperimentResult, make_context, mean_std
from moekit.repro.experiments.options import OptionError
from moekit.repro.experiments.deepmoe import EXPERIMENT, gated_name, plain_name

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def make_ctx(tmp_path, argv=(), seeds=1, quick=True):
    return make_context(EXPERIMENT, tmp_path, argv, seeds=seeds, quick=quick)


def test_quick_run_sane_bands(tmp_path):
    ctx = make_ctx(tmp_path)
    res = EXPERIMENT.run(ctx)
    assert isinstance(res, ExperimentResult)
    names = [plain_name(1.0), plain_name(2.0), gated_name("narrow", 0.01), gated_name("wide", 0.01)]
    assert [r.name for r in res.rows] == names
    assert res.paper == []                       # the paper's claims are qualitative: verdicts, no paper rows
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["Wide", "Narrow"]
    assert any("wide" in n and "narrow" in n for n in res.notes)
    # measured in quick mode (4 + 1 epochs): plain ≈ 96–98 %, narrow ≈ 91 %, wide ≈ 96 %
    for name in names:
        assert 75.0 < res.mean(name, "test_acc") <= 100.0
        assert len(next(r for r in res.rows if r.name == name).metrics["test_acc"]) == 1
    assert res.mean(plain_name(1.0), "flops_vs_plain") == 1.0
    assert res.mean(plain_name(1.0), "kmacs") == pytest.approx(193.344)
    assert 3.8 < res.mean(plain_name(2.0), "flops_vs_plain") < 4.0
    for v in ("narrow", "wide"):
        n = gated_name(v, 0.01)
        assert 0.0 < res.mean(n, "zero_gates") < 1.0
        assert res.mean(n, "flops_vs_dense") < 1.0
        # per-image skipping beats skipping only channels that are off for the whole test set
        assert res.mean(n, "flops_vs_dense") <= res.mean(n, "fullbatch_flops_vs_dense") <= 1.0
        assert 0.0 <= res.mean(n, "embedding_acc") <= 100.0
    # the wide gated net executes fewer FLOPs than its dense version but more than the narrow one
    assert res.mean(gated_name("narrow", 0.01), "kmacs") < res.mean(gated_name("wide", 0.01), "kmacs") \
        < res.mean(plain_name(2.0), "kmacs")
    assert set(ctx.figures) == {"accuracy_vs_flops.png", "sparsity_vs_lambda.png"}
    assert all((tmp_path / f).stat().st_size > 0 for f in ctx.figures)
    (table,) = res.tables.values()
    assert table.startswith("| model |") and table.count("\n") == 3
    assert res.config["quick"] and res.config["epochs"] == 4 and res.config["lambdas"] == [0.01]


def test_same_seed_same_numbers_and_options(tmp_path):
    argv = ["--epochs", "1", "--finetune-epochs", "1", "--plain-widths", "0.5", "--lambdas", "0.02",
            "--eval-batch-size", "50", "--base-channels", "4", "--mu", "0.2", "--batch-size", "128"]
    a = EXPERIMENT.run(make_ctx(tmp_path / "a", argv))
    b = EXPERIMENT.run(make_ctx(tmp_path / "b", argv))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert [r.name for r in a.rows] == [plain_name(0.5), gated_name("narrow", 0.02), gated_name("wide", 0.02)]
    assert a.config["lambdas"] == [0.02] and a.config["finetune_epochs"] == 1 and a.config["base_channels"] == 4
    assert a.config["mu"] == 0.2 and a.config["batch_size"] == 128 and a.config["eval_batch_size"] == 50
    # no plain ×1 was trained: flops_vs_plain still divides by the ×1 network's dense MACs (c = 4: 49568;
    # the ×0.5 plain net, c = 2, has 13008 — both counted by hand layer by layer)
    assert mean_std(a.rows[0].metrics["kmacs"])[0] == pytest.approx(13.008)
    assert mean_std(a.rows[0].metrics["flops_vs_plain"])[0] == pytest.approx(13008 / 49568)


@pytest.mark.parametrize("argv,match", [
    (["--lambdas", "0,-1"], "--lambdas"),
    (["--lambdas", "a,b"], "--lambdas"),
    (["--epochs", "0"], "--epochs"),
    (["--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--mu", "-0.5"], "--mu"),
    (["--plain-widths", "0"], "--plain-widths"),
    (["--eval-batch-size", "0"], "--eval-batch-size"),
    (["--lambdas", "0.02,0,0.02"], "--lambdas: values must be distinct"),
    (["--lr", "inf"], "--lr: must be a finite"),
])
def test_bad_options_raise(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        make_ctx(tmp_path, argv)


def test_defaults_and_quick_values():
    full = EXPERIMENT.make_config({}, quick=False)
    assert full.lambdas[0] == 0.0 and len(full.lambdas) >= 3 and full.epochs >= 10 and full.eval_batch_size == 1
    quick = EXPERIMENT.make_config({"plain_widths": ["2", "1"]}, quick=True)
    assert quick.lambdas == (0.01,) and quick.plain_widths == (2.0, 1.0) and quick.epochs == 4
