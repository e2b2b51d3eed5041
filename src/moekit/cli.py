"""The ``moekit`` command: ``moekit list`` and ``moekit run NAME [options]``.

Exit status: 0 done (also ``--help``); 2 usage error (unknown experiment, a bad option value or one out
of range, an ``--out`` that holds something without ``--overwrite``, is the working directory or one of
its parents, or is being written by another run), printed in one line that names the flag, before any
folder is created; 1 the run itself failed (its traceback is printed); 130 interrupted (Ctrl-C), 143
terminated (SIGTERM), 129 hung up (SIGHUP). The results table goes to stdout, progress and errors to
stderr. A failed, interrupted or terminated run leaves ``--out`` as it was (see
:mod:`moekit.repro.experiments.runner`).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import signal
import sys
import traceback
from typing import Sequence

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP so the run cleans up as after Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def _terminate_as_exception():
    """While the body runs, SIGTERM and SIGHUP raise :class:`Terminated` (the previous handlers come back
    afterwards). Outside the main thread signals cannot be caught and nothing changes."""
    wanted = [getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n)]
    previous = {}

    def handler(signum, frame):
        raise Terminated(signum)
    try:
        for sig in wanted:
            previous[sig] = signal.signal(sig, handler)
    except ValueError:      # not the main thread
        pass
    try:
        yield
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _max_threads() -> int:
    return os.cpu_count() or 1


def _thread_count(text: str) -> int:
    top = _max_threads()
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {top} (the CPU count), got {text!r}") from None
    if not 1 <= v <= top:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {top} (the CPU count), got {v}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of the rest of the CLI."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def _top_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="moekit", description="Mixture-of-Experts toolkit: reproduce the papers' results.")
    from . import __version__
    p.add_argument("--version", action="version", version=f"moekit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{list,run}")
    sub.add_parser("list", help="list the experiments")
    r = sub.add_parser("run", help="run an experiment (moekit run NAME --help for its options)", add_help=False)
    r.add_argument("name", nargs="?")
    return p


def _run_parser(name: str, exp) -> argparse.ArgumentParser:
    p = _Parser(prog=f"moekit run {name}", description=f"{exp.paper}: {exp.summary}")
    g = p.add_argument_group("run options")
    g.add_argument("--out", default=None, help="output directory; must not exist or be empty unless --overwrite "
                                               "(default runs/NAME-<timestamp>)")
    g.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty --out, but only once the new run is complete")
    quick_seeds = f", --quick: {exp.quick_seeds}" if exp.quick_seeds is not None else ""
    least = f"; at least {exp.min_seeds}" if exp.min_seeds > 1 else ""
    g.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"number of seeds, run as 0..N-1 (default {exp.default_seeds}{quick_seeds}{least}; "
                        "a claim is graded only from 2 or more)")
    g.add_argument("--quick", action="store_true", help=f"reduced run ({exp.quick_time})")
    g.add_argument("--threads", type=_thread_count, default=1,
                   help=f"torch CPU threads, 1 to {_max_threads()} (default 1: the experiments' small matmuls gain little from more "
                        "and slow down badly on a busy machine; the thread count can change the last digits)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    exp.add_flags(p.add_argument_group(f"{name} options"))
    return p


def _run_usage(lines: list[str]) -> str:
    return "usage: moekit run NAME [--out DIR] [--seeds N] [--quick] [options]\n\nexperiments:\n" + \
        "".join(f"  {line}\n" for line in lines)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv:
        top.print_help(sys.stderr)
        return EXIT_USAGE
    prog = "moekit"
    if argv[0] == "run":
        name = argv[1] if len(argv) > 1 else None
        command = "run"
    else:
        ns, rest = top.parse_known_args(argv)   # --help / --version exit here (status 0)
        command = ns.command
        if command != "list" or rest:
            top.error(f"unrecognized arguments: {' '.join(rest or argv)}")

    from .repro.experiments import available, get
    from .repro.experiments.options import OptionError
    from .repro.experiments.runner import RunError, default_out_dir, list_lines, run_experiment

    if command == "list":
        for line in list_lines(available()):
            print(line)
        return EXIT_OK

    if name in ("-h", "--help"):
        print(_run_usage(list_lines(available())), end="")
        return EXIT_OK
    if name is None or name.startswith("-"):
        print(_run_usage(list_lines(available())), end="", file=sys.stderr)
        print(f"{prog} run: error: expected an experiment name first", file=sys.stderr)
        return EXIT_USAGE
    try:
        exp = get(name)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser = _run_parser(exp.name, exp)
    args = parser.parse_args(argv[2:])          # usage errors exit 2, --help exits 0
    out = args.out if args.out is not None else default_out_dir(exp.name)
    try:
        seeds = args.seeds if args.seeds is not None else exp.seeds_for(args.quick)
        if seeds < exp.min_seeds:
            raise RunError(f"--seeds: {exp.name} needs at least {exp.min_seeds} seeds, got {seeds}")
        config = exp.make_config(args, quick=args.quick)   # every option checked before any folder exists
        from .repro.experiments.runner import check_out_dir
        check_out_dir(out, overwrite=args.overwrite)
    except (OptionError, RunError) as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    import torch
    torch.set_num_threads(args.threads)
    try:
        with _terminate_as_exception():
            run_experiment(exp, args, out, seeds=seeds, quick=args.quick, show_progress=not args.no_progress,
                           command="moekit " + shlex.join(argv), overwrite=args.overwrite, config=config)
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; {out} left as it was", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Terminated as e:
        name = signal.Signals(e.signum).name
        print(f"\n{prog}: stopped by {name}; {out} left as it was", file=sys.stderr)
        return 128 + e.signum
    except RunError as e:
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        traceback.print_exc()
        print(f"{prog}: error: {e} (install the extras: pip install 'moekit[experiments]')", file=sys.stderr)
        return EXIT_FAILED
    except Exception:
        traceback.print_exc()
        print(f"{prog}: error: the run failed (traceback above); {out} left as it was", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
