"""`moekit run sparse-mlp` in quick mode on MNIST: contract, sane bands, matched active parameters, plots,
determinism; the data path (MNIST and 8×8 digits, the validation split, the --shift augmentation); the
capacity-bound prerequisite and the verdicts it gates; option errors (before any folder is written).

Legend: T examples, B batch, I image channels, U × X image height × width, E experts; seeds in words.
"""
import math

import pytest
import torch

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("mlxtend")

from moekit.repro.experiments import sparse_mlp as sm  # noqa: E402
from moekit.repro.experiments.base import Row, make_context  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.runner import run_experiment  # noqa: E402
from moekit.repro.experiments.sparse_mlp import EXPERIMENT  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


def _ctx(out_dir, seeds=1, quick=True, argv=()):
    return make_context(EXPERIMENT, out_dir, argv, seeds=seeds, quick=quick)


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_contract_and_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "sparse-mlp" and EXPERIMENT.default_seeds >= 2
    assert [r.name for r in res.rows] == [sm.DENSE_MATCHED, sm.SPARSE]       # quick: the matched comparison only
    assert "acc_gain_vs_same_widths" not in res.rows[0].metrics              # no same-widths Mixer to compare
    for r in res.rows:
        assert {"test_acc", "active_params", "total_params"} <= set(r.metrics)
        assert "validation_acc" not in r.metrics
        assert all(len(v) == 1 for v in r.metrics.values())                  # one value per seed
    sparse = {r.name: r for r in res.rows}[sm.SPARSE].metrics
    assert {"acc_gain_vs_dense", "cv_load_moe_s", "cv_load_moe_c", "train_cv_load_moe_s"} <= set(sparse)
    assert [p.name for p in res.paper] == [sm.PAPER_ROW] and "ImageNet" in sm.PAPER_ROW
    assert res.paper[0].metrics == {"acc_gain_vs_dense": 2.5} and res.paper[0].source is sm.SOURCE
    assert set(ctx.figures) == {"test_accuracy.png", "routing_block3_moe_s.png", "routing_block3_moe_c.png"}
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000
    assert res.notes and len(res.tables) == 1 and res.config["epochs"] == sm.QUICK_EPOCHS
    # the default data: MNIST 28×28 in 4×4 patches → 49 tokens; 4,000 training and 1,000 test images
    assert res.config["options"]["data"] == "mnist" and res.config["options"]["patch_size"] == 4
    assert "MNIST" in res.config["dataset"] and "4000 training / 1000 evaluation" in res.config["dataset"]
    table = next(iter(res.tables.values()))
    assert "block2/moe_s" in table and "49 patches / image" in table and "8 channel vectors / image" in table


def test_sane_bands(quick_run):
    _, res = quick_run
    for row in (sm.DENSE_MATCHED, sm.SPARSE):
        assert 50.0 < res.mean(row, "test_acc") <= 100.0                      # 10 classes: chance is 10 %
    gain = res.mean(sm.SPARSE, "acc_gain_vs_dense")
    assert math.isclose(gain, res.mean(sm.SPARSE, "test_acc") - res.mean(sm.DENSE_MATCHED, "test_acc"), abs_tol=1e-9)
    # matched active parameters (within 2 %), while the Sparse-MLP holds far more parameters in total
    a_s, a_d = res.mean(sm.SPARSE, "active_params"), res.mean(sm.DENSE_MATCHED, "active_params")
    assert abs(a_s - a_d) / a_s < 0.02
    # total − active = the (E − 1) unused experts of MoE_S (L1 = 2·49 → 16 → L1) and MoE_C (16 → 32 → 16) in
    # each of the 2 sparse blocks
    expert_s, expert_c = 2 * 98 * 16 + 16 + 98, 2 * 16 * 32 + 32 + 16
    assert res.mean(sm.SPARSE, "total_params") - a_s == 2 * (4 - 1) * (expert_s + expert_c)
    assert res.mean(sm.DENSE_MATCHED, "total_params") == a_d
    # expert load: between perfect balance and total collapse onto one expert (sqrt(E - 1) = 1.73 for E = 4)
    for k in ("cv_load_moe_s", "cv_load_moe_c", "train_cv_load_moe_s", "train_cv_load_moe_c"):
        assert 0.0 < res.mean(sm.SPARSE, k) < 1.2, k


def test_quick_verdicts_are_inconclusive_not_ungated(quick_run):
    _, res = quick_run
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["Sparse-MLP", "The"]
    claim = res.verdicts[0]
    # one seed and no same-widths Mixer: the prerequisite is reported as unknown, never silently skipped
    assert claim.verdict == "inconclusive"
    assert "matched active" in claim.reason and "not trained (--quick)" in claim.reason
    assert "mnist 28×28" in claim.reason and "one image = 0.10 points" in claim.reason


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
    # the matched Mixer really is wider (else the prerequisite would compare a model with itself)
    assert models[sm.DENSE_MATCHED]["channel_hidden"] > models[sm.DENSE_SAME]["channel_hidden"]
    assert all(kw["image_size"] == 28 and kw["patch_size"] == 4 for kw in models.values())


def test_options_resolve_the_image_and_patch_per_data_set():
    mnist = sm._options(_ctx("/tmp/unused").config)
    digits = sm._options(_ctx("/tmp/unused", argv=["--data", "digits"]).config)
    seven = sm._options(_ctx("/tmp/unused", argv=["--patch-size", "7"]).config)
    assert (mnist["image_size"], mnist["patch_size"]) == (28, 4)
    assert (digits["image_size"], digits["patch_size"]) == (8, 2)
    assert (seven["image_size"], seven["patch_size"]) == (28, 7)


def _image_keys(x_TIUX):
    """One hashable key per image, invariant to the (positive-scale) standardisation of the split it is in."""
    flat = x_TIUX.flatten(1)
    lo, hi = flat.min(1, keepdim=True).values, flat.max(1, keepdim=True).values
    return {tuple(v) for v in ((flat - lo) / (hi - lo)).mul(255).round().to(torch.int16).tolist()}


def test_mnist_data_and_validation_split():
    x_tr, y_tr, x_te, y_te = sm.load_data("mnist", 0)
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert abs(float(x_tr.mean())) < 1e-4 and abs(float(x_tr.std()) - 1) < 1e-4     # standardised on train
    v_tr, v_ytr, v_val, v_yval = sm.load_data("mnist", 0, "validation")
    assert v_tr.shape == (3000, 1, 28, 28) and v_val.shape == (1000, 1, 28, 28)
    assert torch.bincount(v_yval, minlength=10).tolist() == [100] * 10                 # stratified quarter
    # the validation images are training images, and none of them is a test image
    train, val, test = _image_keys(x_tr), _image_keys(v_val), _image_keys(x_te)
    assert val <= train and not (val & test) and not (_image_keys(v_tr) & val)
    assert torch.equal(sm.load_data("mnist", 0, "validation")[3], v_yval)             # same seed, same split
    assert not torch.equal(sm.load_data("mnist", 1, "validation")[3], v_yval)
    with pytest.raises(ValueError, match="eval_on"):
        sm.load_data("mnist", 0, "train")
    with pytest.raises(ValueError, match="data"):
        sm.load_data("cifar", 0)


def test_same_seed_same_numbers():
    opts = sm._options(_ctx("/tmp/unused", argv=["--epochs", "1", "--depth", "2", "--sparse-blocks", "1",
                                                 "--data", "digits", "--shift", "1"]).config)
    x_tr, y_tr, x_te, y_te = sm.load_data("digits", 0)
    assert x_tr.shape[1:] == (1, 8, 8)
    data = (x_tr[:192], y_tr[:192], x_te[:100], y_te[:100])
    kw = sm.build_models(opts)[sm.SPARSE]
    a, b = (sm.train_one(kw, data, 0, opts) for _ in range(2))
    assert a["eval_acc"] == b["eval_acc"] and a["cv_load"] == b["cv_load"]
    assert all(torch.equal(a["expert_ids"][k], b["expert_ids"][k]) for k in a["layers"])


def test_full_run_on_digits_measures_the_prerequisite(tmp_path):
    # not --quick: the same-widths Mixer is trained and the prerequisite is measured from per-seed pairs
    ctx = _ctx(tmp_path, seeds=2, quick=False, argv=["--data", "digits", "--epochs", "1", "--depth", "2",
                                                    "--sparse-blocks", "1"])
    res = EXPERIMENT.run(ctx)
    assert [r.name for r in res.rows] == [sm.DENSE_SAME, sm.DENSE_MATCHED, sm.SPARSE]
    same, matched = (res.rows[i].metrics["test_acc"] for i in (0, 1))
    gain = res.rows[1].metrics["acc_gain_vs_same_widths"]
    assert len(gain) == 2 and all(math.isclose(g, m - s, abs_tol=1e-9) for g, m, s in zip(gain, matched, same))
    pre = sm.capacity_prerequisite(matched, same)
    assert pre.holds is not None
    claim = res.verdicts[0]
    if pre.holds:
        assert claim.verdict != "not testable" and " holds: " in claim.reason
    else:
        assert claim.verdict == "not testable" and "needs a capacity-bound regime" in claim.reason
    assert "digits 8×8, test set of 450 images" in claim.reason
    assert res.config["options"]["shift"] == 0 and res.config["options"]["patch_size"] == 2
    assert "450 evaluation" in res.config["dataset"]


# ---- the capacity-bound prerequisite and the verdicts it gates (synthetic per-seed numbers) ----------------

def _rows(same, matched, sparse, acc="test_acc", cv=(0.05, 0.06, 0.04)):
    gain = [s - m for s, m in zip(sparse, matched)]
    sp = {acc: list(sparse), "acc_gain_vs_dense": gain, "train_cv_load_moe_s": list(cv),
          "train_cv_load_moe_c": list(cv)}
    rows = [Row(sm.DENSE_MATCHED, {acc: list(matched)}), Row(sm.SPARSE, sp)]
    if same is not None:
        rows.insert(0, Row(sm.DENSE_SAME, {acc: list(same)}))
    return rows


def test_prerequisite_holds_only_when_widening_helps_per_seed():
    assert sm.capacity_prerequisite([91.0, 92.0, 93.0], [90.0, 91.2, 92.1]).holds is True
    # mean gain +0.3 but one seed loses 1 point: mean − 2·se < 0
    assert sm.capacity_prerequisite([91.0, 91.0, 91.0], [90.0, 90.1, 92.0]).holds is False
    assert sm.capacity_prerequisite([90.0, 91.0], [90.5, 91.5]).holds is False           # widening hurts
    assert sm.capacity_prerequisite([91.0], [90.0]).holds is None                      # one seed: unknown
    assert sm.capacity_prerequisite([91.0, 92.0], None).holds is None                  # --quick: not trained
    assert "not trained" in sm.capacity_prerequisite([91.0], None).measured


def test_claim_is_not_testable_when_widening_does_not_help():
    v = sm._verdicts(_rows(same=[93.0, 92.0, 94.0], matched=[93.1, 91.5, 94.0], sparse=[96.0, 95.0, 97.0]))
    assert v[0].verdict == "not testable" and "capacity-bound" in v[0].reason and " holds:" not in v[0].reason
    assert v[1].verdict == "reproduced"                           # the balance claim is graded regardless


@pytest.mark.parametrize("sparse, verdict", [
    ([93.0, 93.0, 94.0], "reproduced"),         # +1 point every seed
    ([92.2, 91.8, 93.2], "partly"),             # mean +0.07, not 2·se clear of 0.5
    ([91.0, 90.0, 92.0], "not reproduced"),     # loses every seed
])
def test_claim_is_graded_when_widening_helps(sparse, verdict):
    v = sm._verdicts(_rows(same=[90.0, 89.0, 91.0], matched=[92.0, 91.9, 93.1], sparse=sparse,
                           acc="validation_acc"), acc="validation_acc", note="a note")
    assert v[0].verdict == verdict and v[0].reason.endswith("a note")
    assert "Sparse-MLP − Mixer matched active (paired)" in v[0].reason
    # the prerequisite that held is shown with its measurement (mean +2.33 over 3 seeds)
    assert "prerequisite a capacity-bound regime (widening the dense Mixer helps) holds: Mixer matched active − " \
           "Mixer same widths (paired) = 2.333 ± " in v[0].reason


def test_claim_without_same_widths_is_inconclusive_even_with_seeds():
    v = sm._verdicts(_rows(same=None, matched=[92.0, 91.9, 93.1], sparse=[93.0, 93.0, 94.0]))
    assert v[0].verdict == "inconclusive" and "not trained" in v[0].reason


# ---- option errors --------------------------------------------------------------------------------------

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
    (["--patch-size", "3"], r"--patch-size: must divide the 28x28 images of --data mnist \(1, 2, 4, 7, 14, 28\)"),
    (["--patch-size", "7", "--data", "digits"], r"--patch-size: must divide the 8x8 images of --data digits"),
    (["--patch-size", "0"], "--patch-size"),
    (["--shift", "-1"], "--shift"),
    (["--shift", "8", "--data", "digits"], "--shift: must be < the image side 8"),
])
def test_bad_options_raise(tmp_path, argv, match):
    with pytest.raises(OptionError, match=match):
        _ctx(tmp_path, argv=argv)


def test_bad_choice_names_the_flag(tmp_path):
    with pytest.raises(OptionError, match="--data: expected one of mnist, digits, got 'cifar'"):
        make_context(EXPERIMENT, tmp_path, data="cifar")
    with pytest.raises(OptionError, match="--eval-on: expected one of test, validation, got 'train'"):
        make_context(EXPERIMENT, tmp_path, eval_on="train")


def test_bad_option_writes_no_folder(tmp_path):
    import argparse
    out = tmp_path / "run"
    with pytest.raises(OptionError, match="--patch-size"):
        run_experiment(EXPERIMENT, argparse.Namespace(patch_size=5), out, quick=True, show_progress=False,
                       print_results=False)
    assert not out.exists() and list(tmp_path.iterdir()) == []
