"""The contract every ``moekit run`` experiment follows (a guide: docs/experiments.md).

An experiment is a module in ``moekit.repro.experiments`` that defines a module-level
``EXPERIMENT = Experiment(...)``; the registry discovers it automatically. Its options are a typed
config dataclass (``Experiment(config=Config)``, fields declared with
:func:`moekit.repro.experiments.options.option`): flags, help and validation derive from it and the run
gets the validated config as ``ctx.config``.

``Experiment.run(ctx)`` trains/evaluates and returns an :class:`ExperimentResult`:
  * ``rows``  – our numbers, one :class:`Row` per model/setting. A metric value is either one float
    or a list of per-seed floats; the runner reports mean ± std over seeds.
  * ``paper`` – the published numbers in the same shape (a metric may carry ``std``), each row with
    its :class:`Source` (paper, table/figure, checked or recalled).
  * ``verdicts`` – one :class:`Verdict` per claim of the paper, graded by
    :func:`moekit.repro.experiments.verdicts.grade` from per-seed statistics and the claim's
    prerequisites: reproduced / partly / not reproduced, inconclusive (fewer than 2 seeds) or not
    testable (a prerequisite failed), with the measured reason in one line.
  * ``config`` – every setting that determines the numbers (so a run can be repeated).
  * ``tables`` – extra markdown tables for the report (e.g. an expert-by-cluster routing table).
Plots are written with ``ctx.savefig(fig, "name.png")`` so the runner can inline them in the report.
"""
from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

T = TypeVar("T")
MetricValue = float | Sequence[float]


SOURCE_STATUS = {"paper": "checked against the paper's text", "code": "checked against the official code",
                 "review": "checked against a public review of the paper (docs/papers.md quotes the line)",
                 "recalled": "recalled, not checked against the paper"}
VERDICTS = ("reproduced", "partly", "not reproduced", "inconclusive", "not testable")


@dataclass(frozen=True)
class Source:
    """Where a paper number comes from: the paper, the table/figure, and how it was obtained
    (``status``: ``"paper"`` checked against the paper's text, ``"code"`` checked against the
    authors' official code or its README, ``"review"`` checked against a public review or slide deck of
    the paper (docs/papers.md names it and quotes the line), ``"recalled"`` not checked). docs/papers.md lists them all."""
    paper: str
    where: str
    status: str

    def __post_init__(self) -> None:
        if self.status not in SOURCE_STATUS:
            raise ValueError(f"status: expected one of {sorted(SOURCE_STATUS)}, got {self.status!r}")

    def __str__(self) -> str:
        return f"{self.paper}, {self.where} ({SOURCE_STATUS[self.status]})"


@dataclass
class Row:
    name: str
    metrics: dict[str, MetricValue]
    std: dict[str, float] = field(default_factory=dict)  # only for paper rows with a published std
    source: Source | None = None                         # paper rows: where the numbers come from


@dataclass(frozen=True)
class Verdict:
    """One claim of the paper and whether our run reproduces it (``verdict`` in :data:`VERDICTS`),
    with the measured reason in one line. Experiments get theirs from
    :func:`moekit.repro.experiments.verdicts.grade`."""
    claim: str
    verdict: str
    reason: str

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict: expected one of {VERDICTS}, got {self.verdict!r}")
        if "\n" in self.reason:
            raise ValueError("reason: must be one line")


@dataclass
class ExperimentResult:
    rows: list[Row]
    paper: list[Row]
    config: dict[str, Any]
    tables: dict[str, str] = field(default_factory=dict)   # title -> markdown table
    notes: list[str] = field(default_factory=list)         # free-text lines for the report
    verdicts: list[Verdict] = field(default_factory=list)  # one per claim of the paper

    def row(self, name: str) -> Row:
        """Our row called ``name`` (KeyError listing the row names otherwise)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {[r.name for r in self.rows]}")

    def mean(self, name: str, metric: str) -> float:
        """Mean over seeds of ``metric`` in our row ``name``."""
        return mean_std(self.row(name).metrics[metric])[0]


class RunContext:
    """What an experiment gets from the runner: options, seeds, output dir, progress, plotting."""

    def __init__(self, args: argparse.Namespace, out_dir: Path, seeds: int = 1, quick: bool = False,
                 progress: Callable[[Iterable[Any], int | None, str], Iterable[Any]] | None = None,
                 log: Callable[[str], None] | None = None, config: Any = None):
        self.args = args          # the parsed command line (run options and the experiment's raw flags)
        self.config = config      # the validated options: an instance of the experiment's config dataclass
        self.out_dir = Path(out_dir)
        self.seeds = seeds
        self.quick = quick
        self.figures: list[str] = []
        self._progress = progress
        self._log = log

    def track(self, iterable: Iterable[T], total: int | None = None, description: str = "") -> Iterator[T]:
        """Wrap a loop with the runner's progress bar (a plain pass-through without one)."""
        if self._progress is None:
            yield from iterable
        else:
            yield from self._progress(iterable, total, description)

    def log(self, msg: str) -> None:
        if self._log is not None:
            self._log(msg)
        else:
            print(msg, file=sys.stderr)

    def savefig(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure into the run directory and register it for the report."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / name
        fig.savefig(path, dpi=110, bbox_inches="tight")
        try:
            import matplotlib.pyplot as plt
            plt.close(fig)
        except ImportError:  # pragma: no cover - savefig implies matplotlib
            pass
        self.figures.append(name)
        return path


@dataclass(frozen=True)
class Experiment:
    name: str                 # `moekit run NAME`
    paper: str                # short citation
    summary: str              # what it shows, one line
    est_time: str             # rough full-run wall time on 2 CPU cores, e.g. "~3 min"
    run: Callable[[RunContext], ExperimentResult]
    quick_time: str = "<1 min"
    default_seeds: int = 1    # seeds of a full run when --seeds is not given
    config: type | None = None  # the options dataclass (flags, help and validation derive from it); None: no options
    quick_seeds: int | None = None  # seeds of a --quick run when --seeds is not given (None: default_seeds)
    min_seeds: int = 1        # fewest seeds the run accepts (checked with the other options, before any folder)

    def seeds_for(self, quick: bool) -> int:
        """Seeds of a run when --seeds is not given."""
        return self.quick_seeds if quick and self.quick_seeds is not None else self.default_seeds

    def add_flags(self, parser: argparse.ArgumentParser | Any) -> None:
        """The experiment's own flags, from its config."""
        if self.config is not None:
            from .options import add_flags
            add_flags(parser, self.config)

    def make_config(self, args: argparse.Namespace | dict[str, Any] | None = None, quick: bool = False) -> Any:
        """The validated config from parsed flags (``None`` for an experiment without options).
        Raises :class:`~moekit.repro.experiments.options.OptionError` naming the flag."""
        if self.config is None:
            return None
        from .options import config_from_namespace
        return config_from_namespace(self.config, args, quick=quick)


def mean_std(values: MetricValue) -> tuple[float, float]:
    """Mean and (population) std of a metric value; a single float has std 0."""
    if isinstance(values, (int, float)):
        return float(values), 0.0
    vals = [float(v) for v in values]
    if not vals:
        return math.nan, math.nan
    m = sum(vals) / len(vals)
    var = sum((v - m) ** 2 for v in vals) / len(vals)
    return m, math.sqrt(var)


def make_context(experiment: Experiment, out_dir: Path | str, argv: Sequence[str] = (), seeds: int = 1,
                 quick: bool = True, **options: Any) -> RunContext:
    """A :class:`RunContext` for calling ``experiment.run`` from Python (notebooks, tests).

    ``argv`` holds the experiment's own options as on the command line (``["--epochs", "3"]``);
    ``options`` gives typed values by field name (``epochs=3``). Unknown flags raise ``SystemExit``
    like the CLI; bad values raise :class:`~moekit.repro.experiments.options.OptionError` naming the flag.
    """
    parser = argparse.ArgumentParser(prog=f"moekit run {experiment.name}")
    experiment.add_flags(parser)
    args = parser.parse_args(list(argv))
    for k, v in options.items():
        setattr(args, k, v)
    config = experiment.make_config(args, quick=quick)
    return RunContext(args, Path(out_dir), seeds=seeds, quick=quick, config=config)
