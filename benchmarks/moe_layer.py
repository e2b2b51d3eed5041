"""Forward+backward time of moekit.MoE against the dense limit and a naive per-expert loop.

The dense limit is the same expert MLP run as one matmul chain on all T·k routed rows — what the
layer would cost if routing, dispatch and grouping were free. A ratio of 1.0 means no overhead.
All variants run interleaved in one process; the table reports medians and ratios.

    python benchmarks/moe_layer.py                       # CPU, float32, E = 8, 64, 256
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16
Legend: T tokens, D dim, H hidden, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import moekit


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def dense_step(x_AD, w1, w2, expert):
    """The expert MLP of expert 0 as one matmul chain on all A = T·K rows, forward + backward."""
    h = x_AD @ w1
    h = F.silu(h[:, : h.shape[1] // 2]) * h[:, h.shape[1] // 2:] if expert == "glu" else F.gelu(h)
    y = h @ w2
    y.backward(torch.ones_like(y))


def naive_loop_step(layer, x_TD):
    """Per-expert Python loop: route, then for each expert gather its tokens and run it."""
    d = layer.router(x_TD)
    bank = layer.experts
    y = torch.zeros_like(x_TD)
    for e in range(layer.num_experts):
        tok, slot = torch.nonzero(d.expert_ids == e, as_tuple=True)
        if tok.numel() == 0:
            continue
        xe = x_TD[tok]
        if isinstance(bank, moekit.experts.GLUExperts):
            g, u = (xe @ bank.w_in[e]).chunk(2, -1)
            he = (F.silu(g) * u) @ bank.w_out[e]
        else:
            he = F.gelu(xe @ bank.w1[e]) @ bank.w2[e]
        y.index_add_(0, tok, he * d.weights[tok, slot, None].to(he.dtype))
    (y.sum() + d.aux_loss).backward()


def moe_step(layer, x_TD):
    out = layer(x_TD)
    (out.y.sum() + out.aux_loss).backward()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--experts", type=int, nargs="+", default=[8, 64, 256])
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert", choices=["glu", "mlp"], default="glu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--no-loop", action="store_true", help="skip the naive per-expert loop")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available; nothing to do")
        return
    dtype = getattr(torch, args.dtype)
    T, D, H, K = args.tokens, args.dim, args.hidden, args.top_k
    print(f"device={device} dtype={args.dtype} threads={torch.get_num_threads()} T={T} D={D} H={H} k={K} "
          f"expert={args.expert} torch={torch.__version__}")
    header = f"{'E':>5} {'dense ms':>9} {'moe ms':>8} {'moe/dense':>9} {'loop ms':>8} {'loop/dense':>10}"
    print(header)
    print("-" * len(header))
    for E in args.experts:
        torch.manual_seed(0)
        layer = moekit.MoE(D, H, E, top_k=K, expert=args.expert).to(device=device, dtype=dtype)
        x_TD = torch.randn(T, D, device=device, dtype=dtype)
        bank = layer.experts
        w1 = (bank.w_in if args.expert == "glu" else bank.w1)[0].detach().clone().requires_grad_()
        w2 = (bank.w_out if args.expert == "glu" else bank.w2)[0].detach().clone().requires_grad_()
        x_AD = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)  # MoE needs dx too
        variants = {"dense": lambda: dense_step(x_AD, w1, w2, args.expert), "moe": lambda: moe_step(layer, x_TD)}
        if not args.no_loop:
            variants["loop"] = lambda: naive_loop_step(layer, x_TD)
        times: dict[str, list[float]] = {k: [] for k in variants}
        for fn in variants.values():        # warm-up
            fn()
        for _ in range(args.repeats):       # interleaved rounds: drift hits every variant alike
            for name, fn in variants.items():
                layer.zero_grad(set_to_none=True)
                w1.grad = w2.grad = x_AD.grad = None
                times[name].append(timed(fn, device))
        med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
        loop = f"{med['loop']:8.1f} {med['loop'] / med['dense']:10.2f}" if "loop" in med else f"{'-':>8} {'-':>10}"
        print(f"{E:>5} {med['dense']:9.1f} {med['moe']:8.1f} {med['moe'] / med['dense']:9.2f} {loop}")


if __name__ == "__main__":
    main()
