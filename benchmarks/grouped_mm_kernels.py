"""CPU grouped-matmul kernels: torch's ``F.grouped_mm`` vs one GEMM per expert written in place.

    python benchmarks/grouped_mm_kernels.py

The five grouped GEMMs of a GLU expert bank's forward+backward (input and output projections, the
input gradient of the output projection, and both weight gradients), at the layer benchmark's shapes
(8,192 rows = T·k, equal rows per expert), 1 and 2 threads. Medians of 5, milliseconds; ``loop`` is
what moekit's CPU kernel does. A dense GEMM of the same total size is shown for scale.
Legend: A rows, E experts, D model dim, H expert hidden dim.
"""
from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F


def median_ms(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2] * 1e3


def loop_mm(x_AD, w_EDH, counts, out_AH):
    s = 0
    for e, c in enumerate(counts):
        torch.mm(x_AD[s:s + c], w_EDH[e], out=out_AH[s:s + c])
        s += c


def loop_wgrad(x_AD, dy_AH, counts, out_EDH):
    s, xt = 0, x_AD.t()
    for e, c in enumerate(counts):
        torch.mm(xt[:, s:s + c], dy_AH[s:s + c], out=out_EDH[e])
        s += c


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--configs", nargs="+", default=["64:512:1024", "256:256:512"], help="E:D:H triples")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    A = args.rows
    print(f"CPU float32, A={A} rows, equal rows per expert; F.grouped_mm / per-expert loop, ms (torch {torch.__version__})")
    for cfg in args.configs:
        E, D, H = (int(v) for v in cfg.split(":"))
        counts = [A // E] * E
        offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
        x, h, dy, dh = torch.randn(A, D), torch.randn(A, H), torch.randn(A, D), torch.randn(A, 2 * H)
        w_in, w_out = torch.randn(E, D, 2 * H), torch.randn(E, H, D)
        o_in, o_out, o_dx = torch.empty(A, 2 * H), torch.empty(A, D), torch.empty(A, H)
        g_in, g_out = torch.empty(E, D, 2 * H), torch.empty(E, H, D)
        w_out_t = w_out.transpose(1, 2)
        cases = {
            "x @ w_in": (lambda: F.grouped_mm(x, w_in, offs=offs), lambda: loop_mm(x, w_in, counts, o_in)),
            "h @ w_out": (lambda: F.grouped_mm(h, w_out, offs=offs), lambda: loop_mm(h, w_out, counts, o_out)),
            "dy @ w_out^T": (lambda: F.grouped_mm(dy, w_out_t, offs=offs), lambda: loop_mm(dy, w_out_t, counts, o_dx)),
            "dw_in": (lambda: F.grouped_mm(x.t(), dh, offs=offs), lambda: loop_wgrad(x, dh, counts, g_in)),
            "dw_out": (lambda: F.grouped_mm(h.t(), dy, offs=offs), lambda: loop_wgrad(h, dy, counts, g_out)),
        }
        for n in args.threads:
            torch.set_num_threads(n)
            cells = [f"{name} {median_ms(a, args.repeats):.0f}/{median_ms(b, args.repeats):.0f}"
                     for name, (a, b) in cases.items()]
            dense = median_ms(lambda: x @ w_in[0], args.repeats)
            print(f"E={E} D={D} H={H} {n}t: " + " | ".join(cells) + f" | dense x@w {dense:.0f}")


if __name__ == "__main__":
    main()
