"""Expert parallelism on CPU/gloo: one MoE layer's forward+backward at EP=1 vs EP=2.

    python benchmarks/expert_parallel.py                 # E = 64 and 256, 4096 tokens per step in all

EP=1 is one process with one thread running the whole global batch; EP=2 is two processes with one
thread each, each running half the batch with half the experts (tokens go to their experts' owner by
all-to-all). Printed per E: step time, tokens/s, the tokens/s ratio EP=2 / EP=1, and the share of the
EP=2 step spent in the all-to-all collectives (from torch.profiler: the dispatch, combine and their
backward exchanges, including the wait for the slower rank).
Legend: T tokens per step (all ranks), D dim, H expert hidden dim, E experts, k experts per token.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time

import torch


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker(args) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import moekit
    from moekit.parallel import expert_parallel, sync_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()
    torch.manual_seed(0)
    layer = moekit.MoE(args.dim, args.hidden, args.experts, top_k=args.top_k, expert="glu")
    if W > 1:
        expert_parallel(layer, init_device_mesh("cpu", (W,)))
    T = args.tokens // W
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(1))[rank * T:(rank + 1) * T]

    def step():
        out = layer(x)
        (out.y.sum() + out.aux_loss).backward()
        if W > 1:
            sync_gradients(layer)
        layer.zero_grad(set_to_none=True)

    for _ in range(2):
        step()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        dist.barrier()
        times.append(time.perf_counter() - t0)
    comm = 0.0
    if W > 1:
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            dist.barrier()
            t0 = time.perf_counter()
            step()
            prof_step = time.perf_counter() - t0
        names = ("all_to_all", "alltoall", "wait_tensor")
        a2a = sum(e.self_cpu_time_total for e in prof.key_averages() if any(n in e.key for n in names)) / 1e6
        comm = a2a / prof_step
    if rank == 0:
        print(json.dumps({"step_s": statistics.median(times), "comm_share": comm}))
    dist.barrier()
    dist.destroy_process_group()


def launch(nproc: int, argv: list[str]) -> dict:
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(nproc),
               OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", *argv], env=dict(env, RANK=str(r)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for r in range(nproc)]
    outs = [p.communicate() for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"a worker failed: exit codes {[p.returncode for p in procs]}\n{outs[0][1][-2000:]}")
    return json.loads(outs[0][0].strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096, help="tokens per step over all ranks (default 4096)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, nargs="+", default=[64, 256])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.experts = args.experts[0]
        worker(args)
        return
    print(f"T={args.tokens} D={args.dim} H={args.hidden} k={args.top_k} GLU experts, float32, one thread per "
          f"process, gloo, torch={torch.__version__}")
    header = f"{'E':>5} {'EP=1 ms':>9} {'EP=2 ms':>9} {'EP=1 tok/s':>11} {'EP=2 tok/s':>11} {'ratio':>6} {'all-to-all':>10}"
    print(header)
    print("-" * len(header))
    for E in args.experts:
        base = ["--tokens", str(args.tokens), "--dim", str(args.dim), "--hidden", str(args.hidden), "--experts",
                str(E), "--top-k", str(args.top_k), "--repeats", str(args.repeats)]
        one, two = launch(1, base), launch(2, base)
        t1, t2 = one["step_s"], two["step_s"]
        print(f"{E:>5} {t1 * 1e3:9.1f} {t2 * 1e3:9.1f} {args.tokens / t1:11.0f} {args.tokens / t2:11.0f} "
              f"{t1 / t2:6.2f} {two['comm_share'] * 100:9.1f}%")


if __name__ == "__main__":
    main()
