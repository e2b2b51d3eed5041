"""The one grading helper: seeds, prerequisites, confidence bounds, divergence, paired and slope statistics;
and no experiment decides a verdict by hand."""
from __future__ import annotations

import ast
import math
from pathlib import Path

import pytest

from moekit.repro.experiments.verdicts import Claims, Prerequisite, Check, grade, paired, slope, slopes

EXPERIMENTS = Path(__file__).resolve().parents[3] / "src" / "moekit" / "repro" / "experiments"


def test_one_seed_is_inconclusive_whatever_the_numbers():
    v = grade("c", Check("gap", [5.0], reproduced=0.5, partly=0.0))
    assert v.verdict == "inconclusive" and "gap = 5.000" in v.reason and "1 seed" in v.reason
    v = grade("c", [Check("a", [1.0, 2.0], 0, 0), Check("b", [-9.0], 0, 0)])
    assert v.verdict == "inconclusive"


def test_bound_decides_reproduced_mean_decides_partly():
    # mean 1, sample std 0.1 over 4 seeds: se 0.05, bound 0.9
    t = Check("gap", [0.9, 1.1, 0.9, 1.1], reproduced=0.85, partly=0.0)
    assert t.se == pytest.approx(math.sqrt(0.04 / 3 / 4)) and t.outcome() == "holds"
    assert grade("c", t).verdict == "reproduced"
    assert grade("c", Check("gap", [0.9, 1.1, 0.9, 1.1], reproduced=0.99, partly=0.0)).verdict == "partly"
    assert grade("c", Check("gap", [0.9, 1.1, 0.9, 1.1], reproduced=2, partly=1.5)).verdict == "not reproduced"
    # a noisy ordering of means is not a reproduction
    assert grade("c", Check("gap", [3.0, -1.0, 2.5, -1.5], reproduced=0.0, partly=0.0)).verdict == "partly"


def test_an_exact_quantity_needs_no_seeds_but_a_measured_one_does():
    flops = Check("FLOPs ratio", [0.76], reproduced=0.8, partly=1.0, higher=False, exact=True)
    assert flops.outcome() == "holds" and "exact" in flops.describe()
    assert grade("c", flops).verdict == "reproduced"
    assert grade("c", [flops, Check("acc drop", [0.5], 1.0, 2.0, higher=False)]).verdict == "inconclusive"


def test_lower_is_better_mirrors_the_thresholds():
    t = Check("entropy", [0.10, 0.12, 0.11], reproduced=0.2, partly=0.5, higher=False)
    assert t.bound > t.mean and grade("c", t).verdict == "reproduced"
    assert grade("c", Check("entropy", [0.4, 0.45], 0.2, 0.5, higher=False)).verdict == "partly"
    assert grade("c", Check("entropy", [0.9, 0.8], 0.2, 0.5, higher=False)).verdict == "not reproduced"
    with pytest.raises(ValueError, match="weaker side"):
        Check("x", [1, 2], reproduced=0.5, partly=0.2, higher=False)


def test_diverged_runs_fail_instead_of_passing():
    v = grade("c", Check("epochs ratio", [0.0, math.inf, 0.4], reproduced=0.9, partly=0.9, higher=False))
    assert v.verdict == "not reproduced" and "diverged" in v.reason
    v = grade("c", Check("accuracy", [math.nan, 0.9], reproduced=0.5, partly=0.5))
    assert v.verdict == "not reproduced"


def test_all_tests_must_hold_and_any_failure_short_of_all_is_partly():
    ok = Check("a", [1.0, 1.0, 1.0], 0.5, 0.0)
    bad = Check("b", [-1.0, -1.0], 0.5, 0.0)
    assert grade("c", [ok, ok]).verdict == "reproduced"
    assert grade("c", [ok, bad]).verdict == "partly"
    assert grade("c", [bad, bad]).verdict == "not reproduced"


def test_a_failed_prerequisite_makes_it_not_testable_with_the_reason():
    pre = [Prerequisite("a base that is not saturated", False, "plain ×2 98.7 % vs ×1 98.7 %"),
           Prerequisite("converged nets", True, "all ≥ 88 %")]
    v = grade("wide beats plain", Check("gain", [2.0, 2.0, 2.0], 0.5, 0.0), pre, note="see table")
    assert v.verdict == "not testable"
    assert "not saturated" in v.reason and "98.7" in v.reason and "converged" not in v.reason
    assert v.reason.endswith("see table") and "\n" not in v.reason
    assert grade("c", Check("gain", [2.0, 2.0], 0.5, 0.0), pre[1:]).verdict == "reproduced"


def test_a_measured_prerequisite():
    helps = Prerequisite.from_check("widening helps", Check("×2 − ×1", [1.0, 1.2, 0.9], 0.0, 0.0))
    saturated = Prerequisite.from_check("widening helps", Check("×2 − ×1", [0.1, -0.2, 0.0], 0.0, 0.0))
    one_seed = Prerequisite.from_check("widening helps", Check("×2 − ×1", [1.0], 0.0, 0.0))
    t = Check("gain", [2.0, 2.1, 1.9], 0.5, 0.0)
    assert helps.holds is True and grade("c", t, [helps]).verdict == "reproduced"
    shown = grade("c", t, [helps], note="n").reason       # what made the claim testable is in its reason
    assert shown.endswith("prerequisite widening helps holds: " + helps.measured + "; n")
    assert saturated.holds is False and grade("c", t, [saturated]).verdict == "not testable"
    assert one_seed.holds is None and grade("c", t, [one_seed]).verdict == "inconclusive"
    unchecked = Prerequisite("widening helps", None, "no wider model was trained")
    v = grade("c", t, [unchecked])
    assert v.verdict == "inconclusive" and v.reason.startswith("a prerequisite could not be checked")


def test_paired_slope_and_claims():
    assert paired([3, 4], [1, 1]) == (2.0, 3.0)
    with pytest.raises(ValueError):
        paired([1], [1, 2])
    assert slope([0, 1, 2], [1, 3, 5]) == pytest.approx(2.0)
    assert slopes([1, 2, 3], [[1, 0], [2, 0], [3, 0]]) == pytest.approx((1.0, 0.0))
    c = Claims()
    c.grade("x", Check("t", [1, 1], 0, 0))
    assert [v.verdict for v in c.verdicts] == ["reproduced"]


def _verdict_literals(path: Path) -> list[str]:
    """Verdict words written as string literals in a module (other than in docstrings)."""
    words = {"reproduced", "partly", "not reproduced", "inconclusive", "not testable"}
    tree = ast.parse(path.read_text())
    docstrings = {id(n.body[0].value) for n in ast.walk(tree)
                  if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef)) and n.body
                  and isinstance(n.body[0], ast.Expr) and isinstance(n.body[0].value, ast.Constant)}
    return [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and isinstance(n.value, str)
            and n.value in words and id(n) not in docstrings]


@pytest.mark.parametrize("module", sorted(p.name for p in EXPERIMENTS.glob("*.py")
                                          if p.name not in ("base.py", "verdicts.py")))
def test_no_experiment_decides_a_verdict_by_hand(module):
    assert _verdict_literals(EXPERIMENTS / module) == []
