"""CPU grouped-matmul kernels: torch's ``F.grouped_mm`` vs one GEMM per expert written in place.

    python benchmarks/grouped_mm_kernels.py

The five grouped GEMMs of a GLU expert bank's forward+backward (input and output projections, the
input gradient of the output projection, and both weight gradients), at the layer benchmark's shapes
(8,192 rows = T·k, equal rows per expert), 1 and 2 threads. Medians of 5, milliseconds, shown as
``F.grouped_mm / loop``; ``loop`` is what moekit's CPU kernel does. Both write a fresh output, as in a
training step; the weight gradients have a third number, the loop adding into a kept gradient
(``fuse_grad_accumulation``), which skips the first-touch page faults of a fresh weight-sized buffer.
A dense GEMM of the same total size is shown for scale.
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


def loop_mm(x_AD, w_EDH, counts):
    out_AH = x_AD.new_empty(x_AD.shape[0], w_EDH.shape[-1])     # a fresh output, as F.grouped_mm returns
    s = 0
    for e, c in enumerate(counts):
        torch.mm(x_AD[s:s + c], w_EDH[e], out=out_AH[s:s + c])
        s += c
    return out_AH


def loop_wgrad(x_AD, dy_AH, counts, out_EDH=None):
    """Into a fresh gradient, or added into ``out_EDH`` (gradient-accumulation fusion) when given."""
    fresh = out_EDH is None
    if fresh:
        out_EDH = x_AD.new_empty(len(counts), x_AD.shape[1], dy_AH.shape[1])
    s, xt = 0, x_AD.t()
    for e, c in enumerate(counts):
        if fresh:
            torch.mm(xt[:, s:s + c], dy_AH[s:s + c], out=out_EDH[e])
        else:
            out_EDH[e].addmm_(xt[:, s:s + c], dy_AH[s:s + c])
        s += c
    return out_EDH


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=8192)
    p.add_argument("--configs", nargs="+", default=["64:512:1024", "256:256:512"], help="E:D:H triples")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    A = args.rows
    print(f"CPU float32, A={A} rows, equal rows per expert; F.grouped_mm / per-expert loop [/ loop adding into a kept gradient], ms (torch {torch.__version__})")
    for cfg in args.configs:
        E, D, H = (int(v) for v in cfg.split(":"))
        counts = [A // E] * E
        offs = torch.cumsum(torch.tensor(counts), 0).to(torch.int32)
        x, h, dy, dh = torch.randn(A, D), torch.randn(A, H), torch.randn(A, D), torch.randn(A, 2 * H)
        w_in, w_out = torch.randn(E, D, 2 * H), torch.randn(E, H, D)
        g_in, g_out = torch.zeros(E, D, 2 * H), torch.zeros(E, H, D)      # kept gradients, for the fused add
        w_out_t = w_out.transpose(1, 2)
        cases = {
            "x @ w_in": (lambda: F.grouped_mm(x, w_in, offs=offs), lambda: loop_mm(x, w_in, counts), None),
            "h @ w_out": (lambda: F.grouped_mm(h, w_out, offs=offs), lambda: loop_mm(h, w_out, counts), None),
            "dy @ w_out^T": (lambda: F.grouped_mm(dy, w_out_t, offs=offs), lambda: loop_mm(dy, w_out_t, counts),
                             None),
            "dw_in": (lambda: F.grouped_mm(x.t(), dh, offs=offs), lambda: loop_wgrad(x, dh, counts),
                      lambda: loop_wgrad(x, dh, counts, g_in)),
            "dw_out": (lambda: F.grouped_mm(h.t(), dy, offs=offs), lambda: loop_wgrad(h, dy, counts),
                       lambda: loop_wgrad(h, dy, counts, g_out)),
        }
        for n in args.threads:
            torch.set_num_threads(n)
            cells = []
            for name, (a, b, fused) in cases.items():
                cell = f"{name} {median_ms(a, args.repeats):.0f}/{median_ms(b, args.repeats):.0f}"
                if fused is not None:
                    cell += f"/{median_ms(fused, args.repeats):.0f}"
                cells.append(cell)
            dense = median_ms(lambda: x @ w_in[0], args.repeats)
            print(f"E={E} D={D} H={H} {n}t: " + " | ".join(cells) + f" | dense x@w {dense:.0f}")


if __name__ == "__main__":
    main()
