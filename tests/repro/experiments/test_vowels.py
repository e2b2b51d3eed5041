"""`moekit run vowels` in quick mode: contract, sane bands, gate specialisation, determinism, option errors.

Legend: E experts, S seeds.
"""
import math

import pytest

pytest.importorskip("matplotlib")

from moekit.repro.experiments.base import ExperimentResult, make_context, mean_std  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.vowels import EXPERIMENT  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)

ROWS = ["ME 4 experts", "ME 8 experts", "BP 6 hidden", "BP 12 hidden"]


def _ctx(out_dir, seeds=2, quick=True, argv=()):
    return make_context(EXPERIMENT, out_dir, argv, seeds=seeds, quick=quick)


QUICK_SEEDS = 2      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def _table_value(res: ExperimentResult, title_start: str, row: str, col: int) -> float:
    table = next(v for k, v in res.tables.items() if k.startswith(title_start))
    line = next(ln for ln in table.splitlines() if ln.startswith(f"| {row} |"))
    return float(line.split("|")[col + 1].split("±")[0])


def test_contract_and_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "vowels"
    assert [r.name for r in res.rows] == ROWS + ["speaker-gated ME 4 experts (10 vowels)",
                                                 "BP 12 hidden (10 vowels, same inputs)"]
    assert [r.name for r in res.paper] == ROWS
    for r in res.rows[:len(ROWS)]:
        assert set(r.metrics) == {"train_acc", "test_acc", "epochs_to_criterion"}
        assert all(len(v) == 2 for v in r.metrics.values())  # one value per seed
    assert res.config["epochs"] == 300 and res.config["seeds"] == [0, 1]
    assert any("recalled" in n for n in res.notes)
    assert any(k.startswith("ME 4 experts, seed 0: vowel") for k in res.tables)
    assert any(k.startswith("ME 8 experts, seed 0: speaker group") for k in res.tables)
    assert {"train_accuracy.png", "train_loss.png", "f1_f2_gate_regions.png",
            "routing_vowel_me_4_experts.png", "routing_speaker_me_8_experts.png"} <= set(ctx.figures)
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000


def test_sane_bands(quick_run):
    _, res = quick_run
    share = res.row("speaker-gated ME 4 experts (10 vowels)").metrics["H_speaker_given_expert_share"]
    assert all(0.0 <= v <= 1.0 + 1e-9 for v in share)
    # 10 vowels from F0-F3 + speaker group: far above chance (10 %) after 300 quick epochs
    assert res.mean("speaker-gated ME 4 experts (10 vowels)", "test_acc") > 50.0
    for r in res.rows[:len(ROWS)]:
        # 4 vowels from F1/F2: chance is 25 %, the paper's nets reach ≈88–90 %; 300 quick epochs get > 75 %
        assert mean_std(r.metrics["train_acc"])[0] > 75.0, r.name
        assert mean_std(r.metrics["test_acc"])[0] > 70.0, r.name
        for e in r.metrics["epochs_to_criterion"]:
            assert math.isnan(e) or 0 <= e <= 300
    # the paper's finding: the gate splits the vowel space, experts specialise on vowel pairs
    # (H(vowel | expert) well below the label entropy ln 4 = 1.386; 0.693 = one pair of vowels per expert)
    for name in ("ME 4 experts", "ME 8 experts"):
        assert _table_value(res, "Routing entropy", name, 1) < 1.0
        assert _table_value(res, "Routing entropy", name, 3) >= 2.0  # at least two experts in use


def test_same_seed_same_numbers(tmp_path):
    runs = [EXPERIMENT.run(_ctx(tmp_path / str(i), seeds=1, argv=["--epochs", "100"])) for i in range(2)]
    for a, b in zip(runs[0].rows, runs[1].rows):
        assert a.metrics == b.metrics or "epochs_to_criterion" in a.metrics
        for k in ("train_acc", "test_acc"):
            assert a.metrics[k] == b.metrics[k]
        if "epochs_to_criterion" not in a.metrics:      # the speaker-gated rows
            continue
        ea, eb = a.metrics["epochs_to_criterion"][0], b.metrics["epochs_to_criterion"][0]
        assert ea == eb or (math.isnan(ea) and math.isnan(eb))
    assert runs[0].tables == runs[1].tables


@pytest.mark.parametrize("argv,arg", [(["--epochs", "0"], "--epochs"), (["--criterion", "1.5"], "--criterion"),
                                      (["--lr-me", "nan"], "--lr-me: must be a finite"),
                                      (["--lr-bp", "0"], "--lr-bp"), (["--hidden", "0"], "--hidden"),
                                      (["--hidden", "-3"], "--hidden"), (["--experts", "0"], "--experts"),
                                      (["--experts", "", "--hidden", ""], "--experts")])
def test_bad_options(tmp_path, argv, arg):
    with pytest.raises(OptionError, match=arg):
        _ctx(tmp_path, seeds=1, argv=argv)


def test_verdicts(quick_run):
    _, res = quick_run
    assert [v.claim.split(" ")[0] for v in res.verdicts] == ["All", "Mixtures", "The", "With", "The"]
    acc, speed, local, speaker, error = res.verdicts
    assert "H(speaker group | expert) / H(speaker group)" in speaker.reason
    assert "mixture − single net test accuracy (paired)" in error.reason
    assert acc.verdict in ("reproduced", "partly")   # 300 quick epochs: at or a little below the band
    assert "ratio of epochs" in speed.reason or "reached" in speed.reason
    assert "H(vowel | expert)" in local.reason


def _rows(me_epochs, bp_epochs, me_acc=92.0, bp_acc=91.0):
    from moekit.repro.experiments.base import Row
    rows = []
    for name in ROWS:
        me = name.startswith("ME")
        epochs, acc = (me_epochs, me_acc) if me else (bp_epochs, bp_acc)
        rows.append(Row(name, {"train_acc": [acc] * len(epochs), "test_acc": [acc + d for d in (0.5, -0.5, 0.0)][:len(epochs)],
                               "epochs_to_criterion": list(epochs)}))
    return rows


def test_epochs_claim_needs_every_net_to_reach_the_criterion():
    from moekit.repro.experiments.vowels import _verdicts
    ent = {"ME 4 experts": [0.5, 0.55, 0.45], "ME 8 experts": [0.4, 0.42, 0.38]}
    good = _verdicts(_rows([45.0, 50.0, 40.0], [380.0, 400.0, 390.0]), ent, math.log(4), 0.88, 3000)
    assert [v.verdict for v in good] == ["reproduced"] * 3
    # a diverged BP net never reaches the criterion: that is no win for the mixtures
    diverged = _verdicts(_rows([45.0, 50.0, 40.0], [math.nan, math.nan, math.nan], bp_acc=25.0), ent,
                         math.log(4), 0.88, 3000)
    acc, speed, _ = diverged
    assert speed.verdict == "not testable" and "reached" in speed.reason
    assert acc.verdict == "partly" and "BP 6 hidden test acc" in acc.reason
    # nets far above the paper's accuracy are not penalised
    high = _verdicts(_rows([45.0, 50.0, 40.0], [380.0, 400.0, 390.0], me_acc=99.0, bp_acc=99.0), ent,
                     math.log(4), 0.88, 3000)
    assert high[0].verdict == "reproduced"
    slow = _verdicts(_rows([390.0, 400.0, 380.0], [380.0, 400.0, 390.0]), ent, math.log(4), 0.88, 3000)
    assert slow[1].verdict == "not reproduced"
    one = _verdicts(_rows([45.0], [380.0]), {k: v[:1] for k, v in ent.items()}, math.log(4), 0.88, 3000)
    assert {v.verdict for v in one} == {"inconclusive"}
