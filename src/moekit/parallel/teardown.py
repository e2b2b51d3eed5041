"""Ending a finished multi-process run: :func:`end_process`.

Why a process that has finished its work leaves with ``os._exit``. With gloo on torch 2.13, a process
that called ``destroy_process_group()`` and returned normally was, rarely, aborted while the
interpreter shut down ("terminate called without an active exception", SIGABRT): objects that still
hold a process group — FSDP2 state, device meshes, functional-collective registrations, often kept
alive by reference cycles — are destroyed during interpreter finalisation or C++ static destruction,
and a gloo thread torn down there ends the process. Seen in about 1 of 30 multi-process test runs, once
every rank had written and checked its results; freeing cycles and destroying the groups first makes
it rarer but was not shown to remove it. A finished run must not turn into a failure in its last
microsecond, so :func:`end_process` does the teardown in an order that is right anyway — wait for every
rank, free unreachable objects, destroy every process group, flush the standard streams — and then
skips interpreter finalisation. The price is that ``atexit`` handlers do not run: call it last, from
a script's entry point, never from library code.
"""
from __future__ import annotations

import gc
import os
import sys
from typing import Callable, NoReturn


def end_process(code: int = 0) -> None:
    """Barrier (when every rank succeeded), free reference cycles, destroy all process groups, flush
    stdout/stderr, then ``os._exit(code)``. Call it as the last statement of a multi-process script's
    entry point; ``code`` non-zero skips the barrier (a failed rank must not wait for the others)."""
    import torch.distributed as dist
    try:
        if dist.is_available() and dist.is_initialized():
            if code == 0:
                dist.barrier()                 # no rank tears the group down while another still uses it
            gc.collect()                       # models, meshes and FSDP state that still hold a group
            dist.destroy_process_group()
        gc.collect()
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)


def run_then_end(main: Callable[[], int | None]) -> NoReturn:
    """Run a multi-process script's ``main()`` and end the process with its status through
    :func:`end_process`: ``None`` counts as 0, an exception prints its traceback and gives 1, and a
    ``SystemExit`` (argparse's usage errors) keeps its status and message."""
    status = 1
    try:
        status = main() or 0
    except SystemExit as e:
        if e.code is not None and not isinstance(e.code, int):
            print(e.code, file=sys.stderr)
        status = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        import traceback
        traceback.print_exc()
    end_process(status)
