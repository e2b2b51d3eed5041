"""The contract every ``moekit run`` experiment follows.

An experiment is a module in ``moekit.experiments`` that defines a module-level
``EXPERIMENT = Experiment(...)``; the registry discovers it automatically.

``Experiment.run(ctx)`` trains/evaluates and returns an :class:`ExperimentResult`:
  * ``rows``  – our numbers, one :class:`Row` per model/setting. A metric value is either one float
    or a list of per-seed floats; the runner reports mean ± std over seeds.
  * ``paper`` – the published numbers in the same shape (a metric may carry ``std``).
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


@dataclass
class Row:
    name: str
    metrics: dict[str, MetricValue]
    std: dict[str, float] = field(default_factory=dict)  # only for paper rows with a published std


@dataclass
class ExperimentResult:
    rows: list[Row]
    paper: list[Row]
    config: dict[str, Any]
    tables: dict[str, str] = field(default_factory=dict)   # title -> markdown table
    notes: list[str] = field(default_factory=list)         # free-text lines for the report

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
                 log: Callable[[str], None] | None = None):
        self.args = args
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
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    quick_time: str = "<1 min"
    default_seeds: int = 1    # seeds of a full run when --seeds is not given (quick mode may use fewer)


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
                 quick: bool = True) -> RunContext:
    """A :class:`RunContext` for calling ``experiment.run`` from Python (notebooks, tests).

    ``argv`` holds the experiment's own options as on the command line (``["--epochs", "3"]``);
    unknown options raise ``SystemExit`` like the CLI.
    """
    parser = argparse.ArgumentParser(prog=f"moekit run {experiment.name}")
    if experiment.add_arguments is not None:
        experiment.add_arguments(parser)
    return RunContext(parser.parse_args(list(argv)), Path(out_dir), seeds=seeds, quick=quick)
