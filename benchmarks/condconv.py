"""CondConv2d compute modes vs a plain conv: where does ``mode="auto"`` switch?

For each conv shape, number of experts E and batch B it times (median of interleaved repeats) a plain
``nn.Conv2d`` of the same shape, CondConv2d with ``mode="mix_kernels"`` (per-example kernels, one
grouped conv) and ``mode="mix_outputs"`` (E convs as one dense conv, outputs mixed), forward+backward
by default (``--forward-only`` for inference). Ratios are times over the plain conv. ``auto`` is the mode
:func:`moekit.layers.condconv.choose_mode` picks, ``faster`` the one that was measured faster, and
``η≈`` = t_plain / t_mix_kernels is the measured throughput of the grouped conv relative to a dense one
(the constant ``GROUPED_CONV_EFFICIENCY`` of the auto rule, which ignores the small mixing cost).

Measured (CPU, 1 thread, float32, forward+backward, shared and loaded 2-core machine, 9 repeats):
median η over the B > 1 rows 0.64 (constant set to 0.6); auto picked the faster mode in 32/36 cases.
mix_outputs wins for E = 1 with B > 1 (one conv plus a cheap scale); mix_kernels wins for E >= 2 (E convs
cost 2–12× a plain conv, the kernel sum ≈ 1.1–1.7×). Outlier: 32→32 channels on 4×4 maps at B = 64,
where the grouped conv with 2048 groups is ≈ 10× slower than a dense one (η ≈ 0.1) and mix_outputs stays
faster up to E = 4 — tiny maps with many groups are the case where the rule (one η) misjudges.

    python benchmarks/condconv.py                      # CPU, float32, 1 thread
    python benchmarks/condconv.py --threads 2 --forward-only
    python benchmarks/condconv.py --device cuda

Legend: B batch, C in channels, O out channels, S image side, E experts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from moekit.layers.condconv import GROUPED_CONV_EFFICIENCY, CondConv2d

# (name, C, O, S, kernel, stride): the digits CNN's layers and a mid-size layer
SHAPES = [("digits 16→16 @8×8", 16, 16, 8, 3, 1), ("digits 32→32 @4×4", 32, 32, 4, 3, 1),
          ("mid 64→64 @16×16", 64, 64, 16, 3, 1)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _step(fn, x, backward: bool) -> None:
    if backward:
        x.grad = None
        fn(x).sum().backward()
    else:
        with torch.no_grad():
            fn(x)


def bench(shape, E: int, B: int, device: torch.device, dtype: torch.dtype, repeats: int, backward: bool):
    _, C, O, S, k, s = shape
    torch.manual_seed(0)
    plain = torch.nn.Conv2d(C, O, k, s, padding=k // 2).to(device, dtype)
    layer = CondConv2d(C, O, k, E, stride=s, padding=k // 2, own_router=False).to(device, dtype)
    x = torch.randn(B, C, S, S, device=device, dtype=dtype, requires_grad=backward)
    alpha = torch.rand(B, E, device=device, dtype=dtype, requires_grad=backward)

    def run_mode(mode):
        def f(inp):
            layer.mode = mode
            return layer(inp, routing_weights=alpha)
        return f

    fns = {"plain": plain, "mix_kernels": run_mode("mix_kernels"), "mix_outputs": run_mode("mix_outputs")}
    times: dict[str, list[float]] = {n: [] for n in fns}
    for n, f in fns.items():   # warm-up
        _step(f, x, backward)
    for _ in range(repeats):
        for n, f in fns.items():
            _sync(device)
            t0 = time.perf_counter()
            _step(f, x, backward)
            _sync(device)
            times[n].append(time.perf_counter() - t0)
    med = {n: statistics.median(v) for n, v in times.items()}
    layer.mode = "auto"
    auto = layer.resolve_mode(B, S)
    return med, auto


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16"])
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--experts", default="1,2,4,8,16")
    p.add_argument("--batches", default="1,8,64")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--forward-only", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    experts = [int(v) for v in a.experts.split(",")]
    batches = [int(v) for v in a.batches.split(",")]
    what = "forward" if a.forward_only else "forward+backward"
    print(f"# CondConv2d modes, {what}, {device} {a.dtype}, threads={a.threads}; "
          f"GROUPED_CONV_EFFICIENCY={GROUPED_CONV_EFFICIENCY}\n")
    print("| layer | B | E | plain ms | mix_kernels / plain | mix_outputs / plain | faster | auto | η≈ |")
    print("|---|---|---|---|---|---|---|---|---|")
    agree = total = 0
    etas: list[float] = []
    for shape in SHAPES:
        for B in batches:
            for E in experts:
                med, auto = bench(shape, E, B, device, dtype, a.repeats, not a.forward_only)
                faster = "mix_kernels" if med["mix_kernels"] <= med["mix_outputs"] else "mix_outputs"
                agree += faster == auto
                total += 1
                if B > 1:
                    etas.append(med["plain"] / med["mix_kernels"])
                print(f"| {shape[0]} | {B} | {E} | {1e3 * med['plain']:.3f} | "
                      f"{med['mix_kernels'] / med['plain']:.2f} | {med['mix_outputs'] / med['plain']:.2f} | "
                      f"{faster} | {auto} | {med['plain'] / med['mix_kernels']:.2f} |", flush=True)
    print(f"\nauto picked the measured-faster mode in {agree}/{total} cases")
    if etas:
        print(f"median measured η over the B > 1 rows: {statistics.median(etas):.2f} "
              f"(GROUPED_CONV_EFFICIENCY = {GROUPED_CONV_EFFICIENCY})")


if __name__ == "__main__":
    main()
