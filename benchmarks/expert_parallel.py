"""Expert parallelism on CPU/gloo, weak scaling: EP = 1, 2, 4 processes, the same work per process.

    python benchmarks/expert_parallel.py                    # E = 64, 2048 tokens per process, FSDP2 on
    python benchmarks/expert_parallel.py --no-fsdp --ep 1 2

Every process runs a training step (forward, backward, AdamW) of ``Linear → MoE → Linear`` on its own
``--tokens`` tokens; the E experts are split over the EP processes (``expert_parallel`` on a 1-D
``("ep",)`` mesh) and, with FSDP2 (default), ``fully_shard_moe`` shards everything else over them.
Printed per EP size: the median step time, tokens/s per process (flat under perfect weak scaling),
the share of the step spent in the all-to-all exchanges (torch.profiler: dispatch, combine and their
backward exchanges, including the wait for the slowest rank), the parameter + gradient + optimizer
bytes each rank holds, and the peak resident memory of rank 0 (whole process, interpreter included).
With more processes than cores the processes share cores: the machine's core count is printed.
Legend: T tokens per process, D dim, H expert hidden dim, E experts, k experts per token, P EP size.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
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
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh

    import moekit
    from moekit.parallel import expert_parallel, fully_shard_moe, sync_gradients

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    W, rank = dist.get_world_size(), dist.get_rank()

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(args.dim, args.dim)
            self.moe = moekit.MoE(args.dim, args.hidden, args.experts, top_k=args.top_k, expert="glu")
            self.out = nn.Linear(args.dim, args.dim)

        def forward(self, x):
            o = self.moe(self.inp(x))
            return self.out(o.y), o.aux_loss

    torch.manual_seed(0)
    model = Block()
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
    expert_parallel(model, mesh)
    if args.fsdp:
        fully_shard_moe(model, mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(args.tokens, args.dim, generator=torch.Generator().manual_seed(1 + rank))

    def step():
        y, aux = model(x)
        (y.square().mean() + aux).backward()
        if not args.fsdp:
            sync_gradients(model)
        opt.step()
        opt.zero_grad(set_to_none=False)

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
        names = ("all_to_all", "alltoall")
        a2a = sum(e.self_cpu_time_total for e in prof.key_averages() if any(n in e.key for n in names)) / 1e6
        comm = a2a / prof_step

    def local_bytes(t):
        t = t.to_local() if hasattr(t, "to_local") else t
        return t.numel() * t.element_size()
    held = sum(local_bytes(p) + (local_bytes(p.grad) if p.grad is not None else 0) for p in model.parameters())
    held += sum(local_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024        # KiB on Linux -> MiB
    if rank == 0:
        print(json.dumps({"step_s": statistics.median(times), "comm_share": comm, "held_mib": held / 2**20,
                          "peak_rss_mib": peak_rss}))
    from moekit.parallel import end_process
    end_process(0)                 # barrier, destroy the process groups, flush, exit (moekit.parallel.teardown)


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
    p.add_argument("--tokens", type=int, default=2048, help="tokens per process per step (default 2048)")
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4], help="EP sizes (default 1 2 4)")
    p.add_argument("--no-fsdp", dest="fsdp", action="store_false", help="replicated non-expert weights instead")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for n in args.ep:
        if n < 1 or args.experts % n:
            p.error(f"--ep: each size must be positive and divide --experts ({args.experts}), got {n}")
    if args.worker:
        worker(args)
        return
    print(f"T={args.tokens}/process D={args.dim} H={args.hidden} E={args.experts} k={args.top_k} GLU experts, "
          f"float32, one thread per process, gloo, FSDP2 {'on' if args.fsdp else 'off'}, {os.cpu_count()} cores, "
          f"torch={torch.__version__}")
    header = (f"{'P':>3} {'step ms':>8} {'tok/s/proc':>11} {'vs P=1':>7} {'all-to-all':>10} {'held MiB/rank':>14} "
              f"{'peak RSS MiB':>13}")
    print(header)
    print("-" * len(header))
    base = ["--tokens", str(args.tokens), "--dim", str(args.dim), "--hidden", str(args.hidden), "--experts",
            str(args.experts), "--top-k", str(args.top_k), "--repeats", str(args.repeats)]
    if not args.fsdp:
        base.append("--no-fsdp")
    first = None
    for n in args.ep:
        r = launch(n, base)
        tps = args.tokens / r["step_s"]
        first = first or tps
        print(f"{n:>3} {r['step_s'] * 1e3:8.1f} {tps:11.0f} {tps / first:7.2f} {r['comm_share'] * 100:9.1f}% "
              f"{r['held_mib']:14.2f} {r['peak_rss_mib']:13.0f}")


if __name__ == "__main__":
    main()
