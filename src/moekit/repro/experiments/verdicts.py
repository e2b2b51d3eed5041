"""Grading a paper's claim from measured numbers: the one place a verdict is decided.

A claim is graded by :func:`grade` from

* its **prerequisites** (:class:`Prerequisite`): conditions under which the run can test the claim at all
  (the baseline is not saturated, the router follows the clusters, the nets converged). If one fails the
  verdict is ``"not testable"`` with the failed condition and its measurement as the reason;
* one or more **tests** (:class:`Check`): a statistic measured once per seed (a paired difference, a
  per-seed slope, a rate) and two thresholds. A test *holds* when its confidence bound (the mean minus
  ``k`` standard errors, for a statistic that should be high) clears ``reproduced``; it *leans* when the
  mean alone clears ``partly``; otherwise it *fails*;
* the seeds: a statistic from fewer than 2 seeds has no standard error, so the verdict is
  ``"inconclusive"`` whatever the numbers (the measured values are still in the reason).

The verdict is ``"reproduced"`` when every test holds, ``"not reproduced"`` when every test fails, and
``"partly"`` otherwise. A non-finite value (a diverged run) never clears a threshold: it makes its test fail.

Compare models by paired statistics (:func:`paired`: the per-seed difference of two models trained on the
same seed) or by per-seed trends (:func:`slopes`), not by orderings of means.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from .base import Verdict

MIN_SEEDS = 2   # fewest per-seed values a test needs for a standard error


@dataclass(frozen=True)
class Prerequisite:
    """A condition the claim needs to be testable at all: ``what`` it is (said positively: "widening the
    dense model helps"), whether it ``holds`` (``None``: not known from this run, e.g. one seed), and the
    ``measured`` numbers behind that (one line)."""
    what: str
    holds: bool | None
    measured: str

    def __post_init__(self) -> None:
        if self.holds is not None:
            object.__setattr__(self, "holds", bool(self.holds))

    @classmethod
    def from_check(cls, what: str, check: "Check") -> "Prerequisite":
        """A prerequisite that is itself measured: it holds when ``check`` holds (its confidence bound clears
        the ``reproduced`` threshold); with one seed it is unknown (``holds=None``), which makes the claim
        inconclusive rather than untestable."""
        outcome = check.outcome()
        return cls(what, None if outcome == "unknown" else outcome == "holds", check.describe())


def _fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    if a != 0 and (a >= 1e4 or a < 1e-3):
        return f"{v:.3g}"
    return f"{v:.3f}" if a < 10 else f"{v:.2f}"


@dataclass(frozen=True)
class Check:
    """A statistic measured once per seed (``values``) and its thresholds.

    ``higher=True``: the claim wants the statistic high; the test holds when ``mean - k·se >= reproduced``
    and leans when ``mean >= partly``. ``higher=False`` mirrors both (``mean + k·se <= reproduced``,
    ``mean <= partly``). ``se`` is the sample standard deviation over ``sqrt(n)``. ``exact=True`` marks a
    quantity that is the same for every seed (counted, not measured): its value is graded with ``se = 0``."""
    name: str
    values: tuple[float, ...]
    reproduced: float
    partly: float
    higher: bool = True
    k: float = 2.0
    unit: str = ""
    exact: bool = False   # a quantity that does not vary with the seed (a FLOP count): graded by its value


    def __post_init__(self) -> None:
        vals = tuple(float(v) for v in (self.values if isinstance(self.values, Iterable) else [self.values]))
        if not vals:
            raise ValueError(f"check {self.name!r}: no values")
        object.__setattr__(self, "values", vals)
        ok = self.partly <= self.reproduced if self.higher else self.partly >= self.reproduced
        if not ok:
            raise ValueError(f"check {self.name!r}: the 'partly' threshold must be on the weaker side of "
                             f"'reproduced' ({self.partly} vs {self.reproduced}, higher={self.higher})")

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in self.values)

    @property
    def mean(self) -> float:
        return sum(self.values) / self.n

    @property
    def se(self) -> float:
        """Standard error of the mean (nan with one value; 0 for an exact quantity)."""
        if self.exact:
            return 0.0
        if self.n < 2:
            return math.nan
        m = self.mean
        return math.sqrt(sum((v - m) ** 2 for v in self.values) / (self.n - 1) / self.n)

    @property
    def bound(self) -> float:
        """The confidence bound on the claim's side: ``mean - k·se`` (``+`` when lower is better)."""
        return self.mean - self.k * self.se if self.higher else self.mean + self.k * self.se

    def outcome(self) -> str:
        """``"holds"``, ``"leans"`` or ``"fails"`` (also for non-finite values); ``"unknown"`` with one value."""
        if not self.finite:
            return "fails"
        if self.n < MIN_SEEDS and not self.exact:
            return "unknown"
        clears = (lambda v, t: v >= t) if self.higher else (lambda v, t: v <= t)
        if clears(self.bound, self.reproduced):
            return "holds"
        return "leans" if clears(self.mean, self.partly) else "fails"

    def describe(self) -> str:
        u = f" {self.unit}" if self.unit else ""
        if not self.finite:
            bad = sum(not math.isfinite(v) for v in self.values)
            return f"{self.name}: {bad} of {self.n} seeds non-finite (diverged)"
        op = "≥" if self.higher else "≤"
        if self.exact:
            return (f"{self.name} = {_fmt(self.mean)}{u} (exact; needs {op} {_fmt(self.reproduced)}; "
                    f"{self.outcome()})")
        if self.n < MIN_SEEDS:
            return f"{self.name} = {_fmt(self.mean)}{u} (1 seed)"
        side = "-" if self.higher else "+"
        return (f"{self.name} = {_fmt(self.mean)} ± {_fmt(self.se)}{u} (n={self.n}; "
                f"mean {side} {self.k:g}·se = {_fmt(self.bound)}, needs {op} {_fmt(self.reproduced)}; "
                f"{self.outcome()})")


def grade(claim: str, checks: Check | Sequence[Check], prerequisites: Sequence[Prerequisite] = (),
          note: str = "") -> Verdict:
    """The verdict on ``claim`` from its ``checks`` and ``prerequisites`` (see the module docstring);
    ``note`` is appended to the reason."""
    tests = [checks] if isinstance(checks, Check) else list(checks)
    if not tests:
        raise ValueError(f"claim {claim!r}: no check")
    tail = f"; {note}" if note else ""
    failed = [p for p in prerequisites if p.holds is False]
    if failed:
        why = "; ".join(f"needs {p.what}, but {p.measured}" for p in failed)
        return Verdict(claim, "not testable", _one_line(why + tail))
    outcomes = [t.outcome() for t in tests]
    body = "; ".join(t.describe() for t in tests)
    unknown = [p for p in prerequisites if p.holds is None]
    if unknown:
        body = "; ".join(f"prerequisite {p.what} unknown: {p.measured}" for p in unknown) + "; " + body
    if "unknown" in outcomes or unknown:
        why = (f"fewer than {MIN_SEEDS} seeds, no standard error: " if "unknown" in outcomes
               else "a prerequisite could not be checked: ")
        return Verdict(claim, "inconclusive", _one_line(f"{why}{body}{tail}"))
    held = [p for p in prerequisites if p.holds]
    if held:                         # a graded claim shows what made it testable, too
        body += "; " + "; ".join(f"prerequisite {p.what} holds: {p.measured}" for p in held)
    if all(o == "holds" for o in outcomes):
        verdict = "reproduced"
    elif all(o == "fails" for o in outcomes):
        verdict = "not reproduced"
    else:
        verdict = "partly"
    return Verdict(claim, verdict, _one_line(body + tail))


def _one_line(s: str) -> str:
    return " ".join(s.split())


def paired(a: Sequence[float], b: Sequence[float]) -> tuple[float, ...]:
    """Per-seed differences ``a[i] - b[i]`` of two models trained on the same seeds."""
    if len(a) != len(b):
        raise ValueError(f"paired: {len(a)} vs {len(b)} values")
    return tuple(float(x) - float(y) for x, y in zip(a, b))


def slope(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Least-squares slope of ``ys`` on ``xs``."""
    if len(xs) != len(ys) or len(xs) < 2:
        raise ValueError("slope: needs two or more (x, y) pairs of equal length")
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("slope: the x values are all equal")
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx


def slopes(xs: Sequence[float], per_x: Sequence[Sequence[float]]) -> tuple[float, ...]:
    """Per-seed slopes: ``per_x[j][s]`` is the value at ``xs[j]`` for seed ``s``; returns one slope per seed."""
    n = {len(v) for v in per_x}
    if len(n) != 1:
        raise ValueError(f"slopes: unequal seed counts {sorted(n)}")
    return tuple(slope(xs, [float(v[s]) for v in per_x]) for s in range(n.pop()))


@dataclass
class Claims:
    """Collects the verdicts of one run in order (``claims.grade(...)`` = :func:`grade` plus append)."""
    verdicts: list[Verdict] = field(default_factory=list)

    def grade(self, claim: str, checks: Check | Sequence[Check], prerequisites: Sequence[Prerequisite] = (),
              note: str = "") -> Verdict:
        v = grade(claim, checks, prerequisites, note)
        self.verdicts.append(v)
        return v


__all__ = ["Claims", "MIN_SEEDS", "Prerequisite", "Check", "grade", "paired", "slope", "slopes"]
