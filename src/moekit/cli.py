"""The ``moekit`` command: ``moekit list`` and ``moekit run NAME [options]``.

Usage errors (unknown experiment, bad option values, an unwritable --out) print one line and exit
with status 2; an interrupted run exits with 130 and leaves no results.json behind.
"""
from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
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
    g.add_argument("--out", default=None, help="output directory (default runs/NAME-<timestamp>)")
    g.add_argument("--seeds", type=_positive_int, default=None,
                   help=f"number of seeds, run as 0..N-1 (default {exp.default_seeds})")
    g.add_argument("--quick", action="store_true", help=f"reduced run ({exp.quick_time})")
    g.add_argument("--threads", type=_positive_int, default=1,
                   help="torch CPU threads (default 1: the experiments' small matmuls gain little from more "
                        "and slow down badly on a busy machine; the thread count can change the last digits)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars")
    if exp.add_arguments is not None:
        exp.add_arguments(p.add_argument_group(f"{name} options"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv:
        top.print_help()
        return EXIT_USAGE
    ns, rest = top.parse_known_args(argv[:2] if argv[0] == "run" else argv)
    prog = "moekit"

    from .experiments import available, get
    from .experiments.runner import RunError, default_out_dir, list_lines, run_experiment

    if ns.command == "list":
        if rest:
            top.error(f"unrecognized arguments: {' '.join(rest)}")
        for line in list_lines(available()):
            print(line)
        return 0

    # run
    if not ns.name or ns.name in ("-h", "--help"):
        print("usage: moekit run NAME [--out DIR] [--seeds N] [--quick] [options]\n\nexperiments:")
        for line in list_lines(available()):
            print("  " + line)
        return 0 if ns.name else EXIT_USAGE
    try:
        exp = get(ns.name)
    except ValueError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    args = _run_parser(exp.name, exp).parse_args(argv[2:])
    import torch
    torch.set_num_threads(args.threads)
    out = args.out if args.out is not None else default_out_dir(exp.name)
    try:
        run_experiment(exp, args, out, seeds=args.seeds, quick=args.quick, show_progress=not args.no_progress,
                       command="moekit " + shlex.join(argv))
    except KeyboardInterrupt:
        print(f"\n{prog}: interrupted; no results written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (RunError, ValueError, TypeError) as e:
        # option validation inside an experiment raises ValueError/TypeError naming the option
        print(f"{prog}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except ImportError as e:
        print(f"{prog}: error: {e} (install the extras: pip install 'moekit[experiments]')", file=sys.stderr)
        return EXIT_USAGE
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
