"""Start N ranks of a script the way torchrun does (RANK / WORLD_SIZE / MASTER_* in the environment) and
collect them; the expert-parallel and checkpoint tests share it."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, script: Path, *args, wait: bool = True, timeout: float = 300):
    """Start ``nproc`` ranks of ``script`` in one new process group; wait for them (returning their
    outputs, asserting every rank exited 0) or return ``(popens, process group id)``."""
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), WORLD_SIZE=str(nproc),
                    OMP_NUM_THREADS="1",
                    PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, pgid = [], None
    for rank in range(nproc):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(nproc))
        p = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             process_group=0 if pgid is None else pgid)     # one process group: killable together
        pgid = pgid or p.pid
        procs.append(p)
    if not wait:
        return procs, pgid
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        os.killpg(pgid, 9)
        raise
    failed = [f"rank {r} (exit {p.returncode}):\n{out[-4000:]}" for r, (p, out) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return outs
