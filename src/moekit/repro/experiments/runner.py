"""Run an experiment and write its results: ``results.json``, ``report.md`` and the plots.

A run never deletes or overwrites a complete result: it writes everything into a fresh temporary folder
beside ``--out`` and only when the run has finished swaps it into place (an existing ``--out`` is refused
unless ``overwrite=True``, and is then kept until the new result is complete). An interrupted or failed
run leaves ``--out`` as it was. Files get the usual modes (``0666`` minus the umask).

Two runs cannot write one ``--out``: a run holds a lock (``.NAME.lock`` beside ``--out``, removed when the
run ends) from its first check of ``--out`` until its result is in place; a second run is refused. The
working directory and its parents are never accepted as ``--out`` (they could not be swapped out).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import errno
import fcntl
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from moekit.analysis.tables import markdown_table
from .base import Experiment, ExperimentResult, Row, RunContext, mean_std


class RunError(Exception):
    """A problem with how a run was asked for (bad output directory, ...): reported in one line."""


# ---------------------------------------------------------------------------------------------------
# output directory and writes
# ---------------------------------------------------------------------------------------------------

def default_out_dir(name: str, root: Path | str = "runs") -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path(root) / f"{name}-{stamp}"


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_out_dir(out: Path | str, overwrite: bool = False) -> Path:
    """Check, without creating anything, that ``out`` can receive a run; RunError naming --out otherwise.

    ``out`` must not exist, or be an empty directory, or (with ``overwrite``) be a directory; its
    nearest existing parent must be a writable directory."""
    out = Path(out)
    here, target = Path.cwd().resolve(), out.resolve()
    if target == here or target in here.parents:
        raise RunError(f"--out: {out} is the working directory or one of its parents; a run replaces --out "
                       "as a whole, so choose a new folder (e.g. runs/NAME)")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise RunError(f"--out: {out} exists and is not a directory")
        if any(out.iterdir()) and not overwrite:
            raise RunError(f"--out: {out} is not empty (it may hold an earlier result); choose another "
                           "directory or pass --overwrite to replace it once the new run is complete")
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out: cannot create {out}: {parent} is not a writable directory")
    return out


def _lock_path(out: Path) -> Path:
    return out.absolute().parent / f".{out.name}.lock"


@contextlib.contextmanager
def out_dir_lock(out: Path | str) -> Iterator[None]:
    """Hold the lock of ``out`` for the body (RunError naming --out if another run holds it). The lock
    file is created beside ``out`` (with its missing parents) and removed on leaving."""
    out = Path(out)
    path = _lock_path(out)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"--out: cannot write beside {out} ({e.strerror or e})") from None
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        except OSError as e:
            raise RunError(f"--out: cannot write beside {out} ({e.strerror or e})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise RunError(f"--out: another run is writing {out} (lock {path}); wait for it or choose "
                               "another directory") from None
            raise
        try:   # the holder before us may have removed the file after we opened it: lock the current one
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        try:
            os.unlink(path)
        except OSError:
            pass
        os.close(fd)


def prepare_out_dir(out: Path | str, overwrite: bool = False) -> Path:
    """Check ``out`` (:func:`check_out_dir`), create its parents and return a fresh temporary folder
    beside it for the run to write into (see :func:`finish_out_dir`)."""
    out = check_out_dir(out, overwrite)
    try:
        out.absolute().parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.running-"))
        os.chmod(tmp, 0o777 & ~_umask())
    except OSError as e:
        raise RunError(f"--out: cannot write beside {out} ({e.strerror or e})") from None
    return tmp


def finish_out_dir(tmp: Path, out: Path | str) -> Path:
    """Move the complete run in ``tmp`` to ``out``; an earlier ``out`` is replaced only now."""
    out = Path(out)
    old = None
    if out.exists() and not out.is_dir():
        raise RunError(f"--out: {out} became something other than a directory during the run; "
                       f"the result is kept in {tmp}")
    if out.exists():
        old = Path(tempfile.mkdtemp(dir=out.absolute().parent, prefix=f".{out.name}.old-"))
        os.replace(out, old / "previous")
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return out


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either the old file or the complete new one
    (mode ``0666`` minus the umask)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# ---------------------------------------------------------------------------------------------------
# results.json
# ---------------------------------------------------------------------------------------------------

def _json_safe(v: Any) -> Any:
    """NaN/inf become null (strict JSON); tensors/numpy scalars become Python numbers; tuples lists."""
    if hasattr(v, "tolist") and not isinstance(v, (str, bytes)):
        v = v.tolist()
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (str, int, bool)) or v is None:
        return v
    if isinstance(v, Path):
        return str(v)
    return repr(v)


def _row_json(row: Row) -> dict[str, Any]:
    """``{"name", "metrics": {m: mean}, "std": {m: std}, "per_seed": {m: [..]}}`` (std/per_seed when known)."""
    metrics, std, per_seed = {}, dict(row.std), {}
    for m, v in row.metrics.items():
        mu, sd = mean_std(v)
        metrics[m] = mu
        if not isinstance(v, (int, float)):
            per_seed[m] = [float(x) for x in v]
            std[m] = sd
    out: dict[str, Any] = {"name": row.name, "metrics": metrics}
    if std:
        out["std"] = std
    if per_seed:
        out["per_seed"] = per_seed
    if row.source is not None:
        out["source"] = {"paper": row.source.paper, "where": row.source.where, "status": row.source.status}
    return out


def results_json(exp: Experiment, result: ExperimentResult, run_info: dict[str, Any]) -> dict[str, Any]:
    return _json_safe({
        "experiment": exp.name,
        "paper_citation": exp.paper,
        "config": result.config,
        "verdicts": [{"claim": v.claim, "verdict": v.verdict, "reason": v.reason} for v in result.verdicts],
        "rows": [_row_json(r) for r in result.rows],
        "paper": [_row_json(r) for r in result.paper],
        "run": run_info,
        "notes": list(result.notes),
    })


# ---------------------------------------------------------------------------------------------------
# the paper-vs-ours table (markdown for the report, plain rows for the terminal)
# ---------------------------------------------------------------------------------------------------

def _fmt(mu: float, sd: float | None) -> str:
    if mu is None or (isinstance(mu, float) and math.isnan(mu)):
        return "–"
    digits = 0 if abs(mu) >= 1000 else (2 if abs(mu) >= 10 else 3)
    s = f"{mu:.{digits}f}"
    if sd is not None and sd > 0:
        s += f" ± {sd:.{digits}f}"
    return s


def comparison_rows(result: ExperimentResult) -> list[tuple[str, str, str, str]]:
    """``(model, metric, paper, ours)`` for every metric of every row, ours first, then paper-only rows."""
    paper = {r.name: r for r in result.paper}
    out: list[tuple[str, str, str, str]] = []
    seen = set()
    for r in result.rows:
        seen.add(r.name)
        p = paper.get(r.name)
        metrics = list(r.metrics) + [m for m in (p.metrics if p else {}) if m not in r.metrics]
        for m in metrics:
            ours = _fmt(*mean_std(r.metrics[m])) if m in r.metrics else "–"
            theirs = _fmt(mean_std(p.metrics[m])[0], p.std.get(m)) if p and m in p.metrics else "–"
            out.append((r.name, m, theirs, ours))
    for p in result.paper:
        if p.name not in seen:
            for m, v in p.metrics.items():
                out.append((p.name, m, _fmt(mean_std(v)[0], p.std.get(m)), "–"))
    return out


def report_markdown(exp: Experiment, result: ExperimentResult, run_info: dict[str, Any],
                    figures: list[str]) -> str:
    seeds = run_info["seeds"]
    parts = [
        f"# {exp.name}: {exp.summary}",
        f"*{exp.paper}*",
        f"- command: `{run_info['command']}`",
        f"- finished: {run_info['finished']} — wall time {run_info['wall_time_s']:.1f} s, CPU time "
        f"{run_info.get('cpu_time_s', float('nan')):.1f} s ({run_info['threads']} torch threads, {run_info['platform']})",
        f"- seeds: {seeds} (ours: mean ± std over seeds){' — quick mode' if run_info['quick'] else ''}",
    ]
    if result.verdicts:
        parts += ["", "## Claims", "", markdown_table(["claim", "verdict", "why"],
                                                      [[v.claim, f"**{v.verdict}**", v.reason] for v in result.verdicts])]
    parts += ["", "## Paper vs ours", "",
              markdown_table(["model / setting", "metric", "paper", "ours"], comparison_rows(result))]
    if not result.paper:
        parts.append("\n*The paper reports no numbers for this configuration (see notes).*")
    sources = [(r.name, str(r.source)) for r in result.paper if r.source is not None]
    if sources:
        parts += ["", "Sources of the paper numbers (all of them: docs/papers.md):", ""]
        parts += [f"- {name}: {src}" for name, src in sources]
    for title, table in result.tables.items():
        parts += ["", f"### {title}", "", table]
    if result.notes:
        parts += ["", "## Notes", ""] + [f"- {n}" for n in result.notes]
    if figures:
        parts += ["", "## Plots", ""] + [f"![{f}]({f})\n" for f in figures]
    parts += ["", "## Config", "", "```json", json.dumps(_json_safe(result.config), indent=2), "```", ""]
    return "\n".join(parts)


def print_table(exp: Experiment, result: ExperimentResult, wall: float, out_dir: Path, file: Any = None) -> None:
    """The paper-vs-ours table, the verdicts and where the results are, as plain text (stdout by default)."""
    file = sys.stdout if file is None else file
    rows = comparison_rows(result)
    head = ("model / setting", "metric", "paper", "ours")
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print(f"{exp.name}: paper vs ours ({wall:.1f} s)", file=file)
    prev = None
    for r in [head, *rows]:
        cells = (r[0] if r[0] != prev or r is head else "", *r[1:])
        prev = r[0]
        print("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip(), file=file)
    if result.verdicts:
        print("claims:", file=file)
        for v in result.verdicts:
            print(f"  [{v.verdict}] {v.claim}: {v.reason}", file=file)
    print(f"results: {out_dir / 'results.json'}  report: {out_dir / 'report.md'}", file=file)


# ---------------------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------------------

def _rich_console() -> Any:
    try:
        from rich.console import Console
    except ImportError:
        return None
    return Console(stderr=True)


def _make_progress(console: Any) -> tuple[Callable[..., Iterator[Any]] | None, Any]:
    """A ``track(iterable, total, description)`` backed by one rich Progress (nested loops = rows)."""
    if console is None:
        return None, None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn
    progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                        TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False)

    def track(iterable: Iterable[Any], total: int | None = None, description: str = "") -> Iterator[Any]:
        if total is None and hasattr(iterable, "__len__"):
            total = len(iterable)  # type: ignore[arg-type]
        task = progress.add_task(description or "working", total=total)
        try:
            for item in iterable:
                yield item
                progress.advance(task)
        finally:  # finished bars make room for the next loop's
            progress.remove_task(task)
    return track, progress


# ---------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------

def run_experiment(exp: Experiment, args: argparse.Namespace | None, out_dir: Path | str, seeds: int | None = None,
                   quick: bool = False, show_progress: bool = True, print_results: bool = True,
                   command: str | None = None, overwrite: bool = False, config: Any = None
                   ) -> tuple[ExperimentResult, Path]:
    """Run ``exp`` and write ``results.json``, ``report.md`` and its plots into ``out_dir``.

    ``config``: the validated options (built from ``args`` when not given; an
    :class:`~moekit.repro.experiments.options.OptionError` is raised before anything is created).
    ``out_dir`` must not hold anything unless ``overwrite``; the run writes into a temporary folder that
    replaces ``out_dir`` only once it is complete."""

    args = argparse.Namespace() if args is None else args
    if seeds is None:
        seeds = exp.seeds_for(quick)
    if not isinstance(seeds, int) or isinstance(seeds, bool) or seeds < 1:
        raise RunError(f"--seeds: must be a positive integer, got {seeds!r}")
    if seeds < exp.min_seeds:
        raise RunError(f"--seeds: {exp.name} needs at least {exp.min_seeds} seeds, got {seeds}")
    if config is None:
        config = exp.make_config(args, quick=quick)
    with out_dir_lock(out_dir):
        tmp = prepare_out_dir(out_dir, overwrite=overwrite)
        result, wall, out = _run_into(exp, args, tmp, out_dir, seeds, quick, show_progress, command, config)
    if print_results:
        print_table(exp, result, wall, out)
    return result, out


def _run_into(exp: Experiment, args: argparse.Namespace, tmp: Path, out_dir: Path | str, seeds: int, quick: bool,
              show_progress: bool, command: str | None, config: Any) -> tuple[ExperimentResult, float, Path]:
    """Run ``exp`` writing into ``tmp``, then move ``tmp`` to ``out_dir``; ``tmp`` is removed on any failure."""
    import torch
    from moekit import __version__
    try:
        console = _rich_console() if show_progress else None
        track, progress = _make_progress(console)
        ctx = RunContext(args, tmp, seeds=seeds, quick=quick, progress=track,
                         log=(console.log if console is not None else None), config=config)
        t0, cpu0 = time.perf_counter(), time.process_time()
        if progress is not None:
            with progress:
                result = exp.run(ctx)
        else:
            result = exp.run(ctx)
        wall, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        if not isinstance(result, ExperimentResult):
            raise TypeError(f"experiment {exp.name!r}: run() must return an ExperimentResult, "
                            f"got {type(result).__name__}")
        run_info = {
            "command": command or f"moekit run {exp.name}",
            "seeds": seeds,
            "quick": bool(quick),
            "wall_time_s": round(wall, 2),
            "cpu_time_s": round(cpu, 2),   # the run's own CPU time: its cost on a machine shared with other jobs
            "threads": torch.get_num_threads(),
            "finished": _dt.datetime.now().isoformat(timespec="seconds"),
            "moekit": __version__,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "platform": f"{platform.system()} {platform.machine()}",
            "figures": list(ctx.figures),
        }
        for name in ctx.figures:
            os.chmod(tmp / name, 0o666 & ~_umask())
        atomic_write_text(tmp / "report.md", report_markdown(exp, result, run_info, ctx.figures))
        atomic_write_text(tmp / "results.json", json.dumps(results_json(exp, result, run_info), indent=2) + "\n")
        out = finish_out_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result, wall, out


def list_lines(experiments: dict[str, Experiment]) -> list[str]:
    w = max((len(n) for n in experiments), default=0)
    return [f"{name.ljust(w)}  {e.paper}: {e.summary} (full {e.est_time}, --quick {e.quick_time})"
            for name, e in experiments.items()]


__all__ = ["RunError", "atomic_write_text", "out_dir_lock", "check_out_dir", "comparison_rows", "default_out_dir", "finish_out_dir",
           "list_lines", "prepare_out_dir", "print_table", "report_markdown", "results_json", "run_experiment"]
