"""`moekit run deepmoe`: quick run on MNIST (sane bands, rows/metrics/plots), same seed → same numbers on the 8×8
digits, the data splits (validation carved from the training images), the prerequisite logic, bad options.

Legend: T examples, U × X image height × width; seeds are counted in words.
"""
import pytest
import torch

from moekit.repro.experiments.base import ExperimentResult, Row, make_context, mean_std
from moekit.repro.experiments.options import OptionError
from moekit.repro.experiments.deepmoe import EXPERIMENT, _verdicts, gated_name, load_data, plain_name

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def make_ctx(tmp_path, argv=(), seeds=1, quick=True):
    return make_context(EXPERIMENT, tmp_path, argv, seeds=seeds, quick=quick)


def test_quick_run_sane_bands(tmp_path):
    ctx = make_ctx(tmp_path)
    res = EXPERIMENT.run(ctx)
    assert isinstance(res, ExperimentResult)
    names = [plain_name(1.0), plain_name(2.0), gated_name("narrow", 0.002), gated_name("wide", 0.002)]
    assert [r.name for r in res.rows] == names
    assert res.paper == []                       # the paper's claims are qualitative: verdicts, no paper rows
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["Wide", "Narrow"]
    assert any("wide" in n and "narrow" in n for n in res.notes)
    # quick mode (2 + 1 epochs on 4,000 MNIST digits at 14×14): well above chance (10 %) for every model
    for name in names:
        assert 50.0 < res.mean(name, "test_acc") <= 100.0
        assert len(next(r for r in res.rows if r.name == name).metrics["test_acc"]) == 1
    assert res.mean(plain_name(1.0), "flops_vs_plain") == 1.0
    assert res.mean(plain_name(1.0), "kmacs") == pytest.approx(164.912)     # c = 4 at 14×14, counted by hand
    assert 3.8 < res.mean(plain_name(2.0), "flops_vs_plain") < 4.0
    for v in ("narrow", "wide"):
        n = gated_name(v, 0.002)
        assert 0.0 < res.mean(n, "zero_gates") < 1.0
        assert res.mean(n, "flops_vs_dense") < 1.0
        # per-image skipping beats skipping only channels that are off for the whole test set
        assert res.mean(n, "flops_vs_dense") <= res.mean(n, "fullbatch_flops_vs_dense") <= 1.0
        assert 0.0 <= res.mean(n, "embedding_acc") <= 100.0
    # the wide gated net executes fewer FLOPs than its dense version but more than the narrow one
    assert res.mean(gated_name("narrow", 0.002), "kmacs") < res.mean(gated_name("wide", 0.002), "kmacs") \
        < res.mean(plain_name(2.0), "kmacs")
    assert set(ctx.figures) == {"accuracy_vs_flops.png", "sparsity_vs_lambda.png"}
    assert all((tmp_path / f).stat().st_size > 0 for f in ctx.figures)
    (table,) = res.tables.values()
    assert table.startswith("| model |") and table.count("\n") == 3
    assert res.config["quick"] and res.config["epochs"] == 2 and res.config["lambdas"] == [0.002]
    assert res.config["data"] == "mnist" and res.config["pool"] == 2 and res.config["image_side"] == 14
    assert res.config["eval_on"] == "test" and (res.config["train_images"], res.config["eval_images"]) == (4000, 1000)


def test_same_seed_same_numbers_and_options(tmp_path):
    argv = ["--data", "digits", "--base-channels", "4", "--epochs", "1", "--finetune-epochs", "1",
            "--plain-widths", "0.5", "--lambdas", "0.02",
            "--eval-batch-size", "50", "--mu", "0.2", "--batch-size", "128"]
    a = EXPERIMENT.run(make_ctx(tmp_path / "a", argv))
    b = EXPERIMENT.run(make_ctx(tmp_path / "b", argv))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert [r.name for r in a.rows] == [plain_name(0.5), gated_name("narrow", 0.02), gated_name("wide", 0.02)]
    assert a.config["lambdas"] == [0.02] and a.config["finetune_epochs"] == 1 and a.config["base_channels"] == 4
    assert a.config["mu"] == 0.2 and a.config["batch_size"] == 128 and a.config["eval_batch_size"] == 50
    assert a.config["data"] == "digits" and a.config["pool"] == 1 and a.config["image_side"] == 8
    assert (a.config["train_images"], a.config["eval_images"]) == (1347, 450)
    # no plain ×1 was trained: flops_vs_plain still divides by the ×1 network's dense MACs (c = 4: 49568;
    # the ×0.5 plain net, c = 2, has 13008 — both counted by hand layer by layer)
    assert mean_std(a.rows[0].metrics["kmacs"])[0] == pytest.approx(13.008)
    assert mean_std(a.rows[0].metrics["flops_vs_plain"])[0] == pytest.approx(13008 / 49568)


def test_eval_on_validation_scores_held_out_training_images(tmp_path):
    argv = ["--data", "digits", "--eval-on", "validation", "--base-channels", "2", "--epochs", "1",
            "--finetune-epochs", "0", "--plain-widths", "1", "--lambdas", "0.02", "--eval-batch-size", "270"]
    res = EXPERIMENT.run(make_ctx(tmp_path, argv))
    assert res.config["eval_on"] == "validation"
    assert (res.config["train_images"], res.config["eval_images"]) == (1078, 269)     # 20 % of each class, rounded
    assert any("--eval-on validation" in n and "test images are not used" in n for n in res.notes)
    (title,) = res.tables
    assert "validation set" in title


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
    (["--pool", "0"], "--pool"),
    (["--pool", "8"], "--pool: must leave images of at least 4×4"),           # 28 // 8 = 3
    (["--data", "digits", "--pool", "3"], "--pool: .*at most 2"),             # 8 // 3 = 2
])
def test_bad_options_raise(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        make_ctx(tmp_path, argv)


@pytest.mark.parametrize("options,match", [({"data": "cifar"}, "--data"), ({"eval_on": "train"}, "--eval-on")])
def test_bad_choices_raise(options, match):
    with pytest.raises(OptionError, match=match):
        EXPERIMENT.make_config(options)


def test_defaults_and_quick_values():
    full = EXPERIMENT.make_config({}, quick=False)
    assert len(full.lambdas) >= 3 and full.epochs >= 5 and full.eval_batch_size == 1
    assert full.data == "mnist" and full.pool is None and full.eval_on == "test" and full.base_channels == 4
    assert 1.0 in full.plain_widths and 2.0 in full.plain_widths      # the prerequisite compares ×2 with ×1
    assert EXPERIMENT.default_seeds >= 3
    quick = EXPERIMENT.make_config({"plain_widths": ["2", "1"]}, quick=True)
    assert quick.lambdas == (0.002,) and quick.plain_widths == (2.0, 1.0) and quick.epochs == 2


@pytest.mark.parametrize("data,side,levels,n_train,n_test", [("mnist", 14, 255, 4000, 1000),
                                                            ("digits", 8, 16, 1347, 450)])
def test_validation_is_carved_from_the_training_images(data, side, levels, n_train, n_test):
    test = load_data(data, 1)
    val = load_data(data, 1, split="validation")
    assert test.what == "test" and val.what == "validation"
    assert test.x_train.shape == (n_train, 1, side, side) and test.x_eval.shape == (n_test, 1, side, side)
    n_val = len(val.y_eval)
    assert len(val.y_train) + n_val == n_train and n_val == pytest.approx(0.2 * n_train, abs=10)
    for c in range(10):    # stratified: every class holds out its 20 % (± rounding)
        share = float((val.y_eval == c).sum()) / float((test.y_train == c).sum())
        assert share == pytest.approx(0.2, abs=0.01)
    # standardised by the statistics of the images the model trains on
    assert abs(float(val.x_train.mean())) < 1e-4 and abs(float(val.x_train.std()) - 1) < 1e-4
    assert val.mean != test.mean

    def images(d, x):
        """The unpooled images as sets of integer grey levels (exact after undoing the standardisation)."""
        return {tuple(v) for v in torch.round((x * d.std + d.mean) * levels).long().flatten(1).tolist()}
    raw_test, raw_val = load_data(data, 1, pool=1), load_data(data, 1, pool=1, split="validation")
    held_out, train, test_images = images(raw_val, raw_val.x_eval), images(raw_test, raw_test.x_train), \
        images(raw_test, raw_test.x_eval)
    assert held_out <= train                                   # every validation image is a training image
    assert len(held_out & test_images) <= (5 if data == "digits" else 0)   # digits has a few duplicate images


def _row(name, acc, flops=None):
    m = {"test_acc": list(acc)}
    if flops is not None:
        m["flops_vs_plain"] = list(flops)
    return Row(name, m)


def _rows(plain2, wide_acc, wide_flops=(1.0, 1.0, 1.0)):
    plain1 = [90.0, 91.0, 89.0]
    return [_row(plain_name(1.0), plain1, [1.0] * 3), _row(plain_name(2.0), plain2, [3.9] * 3),
            _row(gated_name("narrow", 0.001), [a - 0.5 for a in plain1], [0.75, 0.7, 0.78]),
            _row(gated_name("wide", 0.001), wide_acc, wide_flops)]


def test_prerequisite_holds_when_the_wider_plain_cnn_is_clearly_better():
    verdicts = _verdicts(_rows([94.0, 95.5, 93.0], [92.0, 93.0, 91.5]), [0.001], [1.0, 2.0])
    wide, narrow = verdicts
    assert wide.verdict == "reproduced", wide.reason          # +2, +2, +2.5 points at 1.0× the FLOPs
    assert " holds: plain ×2 − plain ×1 (paired) = 4.167 ± 0.167 points" in wide.reason   # +4, +4.5, +4
    assert narrow.verdict == "reproduced", narrow.reason


def test_the_wide_claim_needs_a_lambda_at_about_the_plain_flops():
    # the wide net is more accurate, but at 0.4×/1.5×/2.5× the FLOPs on the three seeds: not comparable
    wide = _verdicts(_rows([94.0, 95.5, 93.0], [92.0, 93.0, 91.5], (0.4, 1.5, 2.5)), [0.001], [1.0, 2.0])[0]
    assert wide.verdict == "not testable", wide.reason
    assert "about the plain ×1 FLOPs" in wide.reason and "executed FLOPs / plain ×1" in wide.reason


def test_prerequisite_fails_when_the_base_is_saturated():
    # plain ×2 − ×1 = +0.5, -0.5, +1.0: mean − 2·se < 0, so the wide claim cannot be tested
    verdicts = _verdicts(_rows([90.5, 90.5, 90.0], [92.0, 93.0, 91.5]), [0.001], [1.0, 2.0])
    assert verdicts[0].verdict == "not testable"
    assert "plain ×2 − plain ×1" in verdicts[0].reason and "not saturated" in verdicts[0].reason
    assert verdicts[1].verdict == "reproduced"                 # the narrow claim has no such prerequisite


def test_prerequisite_needs_a_plain_width_above_one_and_two_seeds():
    verdicts = _verdicts(_rows([94.0, 95.5, 93.0], [92.0, 93.0, 91.5]), [0.001], [1.0])
    # not measured by this run (no wider plain CNN): inconclusive, not "not testable"
    assert verdicts[0].verdict == "inconclusive" and "no plain width above ×1" in verdicts[0].reason
    one = [Row(r.name, {k: v[:1] for k, v in r.metrics.items()})
           for r in _rows([94.0, 95.5, 93.0], [92.0, 93.0, 91.5])]
    assert [v.verdict for v in _verdicts(one, [0.001], [1.0, 2.0])] == ["inconclusive", "inconclusive"]
