"""Forward+backward time of moekit.MoE against the dense limit and a naive per-expert loop.

The dense limit is the same expert MLP run as one matmul chain on all T·k routed rows — what the
layer would cost if routing, dispatch and grouping were free. A ratio of 1.0 means no overhead.
All variants run interleaved in one process; the table reports medians and ratios.

    python benchmarks/moe_layer.py                       # CPU, float32, E = 8, 64, 256, 1 and 2 threads
    python benchmarks/moe_layer.py --device cuda --dtype bfloat16 --threads 1

When transformers is installed, its Mixtral MoE block (``_experts_implementation = "grouped_mm"``) is timed
beside moekit with the same weights and routing (the moekit layer is built from it by
``moekit.hf.from_hf``); ``m/p`` is moekit's ratio over transformers' (below 1: moekit is faster).

Gradients are dropped between steps (``zero_grad(set_to_none=True)``, PyTorch's default) unless
``--keep-grads``: then every variant keeps and zeroes them in place (``set_to_none=False``, the loop of
gradient accumulation and of DDP's gradient buckets) and moekit's banks fuse the accumulation into the
weight-gradient GEMMs (``fuse_grad_accumulation=True``).
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


def peak_mb(fn) -> float:
    """Peak of the bytes that ``fn`` holds allocated through torch's CPU allocator, in MiB (from the
    profiler's allocation events: the tensors alive at the worst moment, including gradients the step
    creates; not what the C library keeps cached)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak / 2**20


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


def peer_block(layer_like: dict, device, dtype):
    """transformers' Mixtral MoE block with the grouped_mm experts implementation, and a moekit layer
    built from it (``moekit.hf.from_hf``: the same weights, the same routing)."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    from moekit.hf import from_hf
    cfg = MixtralConfig(hidden_size=layer_like["D"], intermediate_size=layer_like["H"],
                        num_local_experts=layer_like["E"], num_experts_per_tok=layer_like["K"])
    cfg._experts_implementation = "grouped_mm"
    block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    layer = from_hf(block)
    layer.experts.fuse_grad_accumulation = layer_like.get("fuse", False)
    return block.to(device=device, dtype=dtype).train(), layer.to(device=device, dtype=dtype).train()


def peer_step(block, x_TD):
    y = block(x_TD[None])
    y.sum().backward()


def measure(E, D, H, T, K, args, device, dtype) -> dict[str, float]:
    """Median over interleaved rounds of (variant time / dense-limit time)."""
    torch.manual_seed(0)
    block = None
    if args.peer:
        block, layer = peer_block({"D": D, "H": H, "E": E, "K": K, "fuse": args.keep_grads}, device, dtype)
    else:
        layer = moekit.MoE(D, H, E, top_k=K, expert=args.expert,
                           expert_options={"fuse_grad_accumulation": args.keep_grads}).to(device=device, dtype=dtype)
    # a layer inside a network: every variant computes the gradient of its input too
    x_TD = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    bank = layer.experts
    w1 = (bank.w_in if args.expert == "glu" else bank.w1)[0].detach().clone().requires_grad_()
    w2 = (bank.w_out if args.expert == "glu" else bank.w2)[0].detach().clone().requires_grad_()
    x_AD = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)
    variants = {"dense": lambda: dense_step(x_AD, w1, w2, args.expert), "moekit": lambda: moe_step(layer, x_TD)}
    if block is not None:
        variants["transformers"] = lambda: peer_step(block, x_TD)
    if args.loop:
        variants["loop"] = lambda: naive_loop_step(layer, x_TD)
    ratios: dict[str, list[float]] = {k: [] for k in variants if k != "dense"}
    dense_s: list[float] = []

    def reset_grads():
        layer.zero_grad(set_to_none=not args.keep_grads)
        if block is not None:
            block.zero_grad(set_to_none=not args.keep_grads)
        for v in (w1, w2, x_AD, x_TD):
            if args.keep_grads and v.grad is not None:
                v.grad.zero_()
            else:
                v.grad = None

    for fn in variants.values():        # warm-up
        fn()
    for _ in range(args.repeats):       # interleaved rounds: drift hits every variant alike
        t = {}
        for name, fn in variants.items():
            reset_grads()
            t[name] = timed(fn, device)
        for k in ratios:
            ratios[k].append(t[k] / t["dense"])
        dense_s.append(t["dense"])
    out = {"dense_ms": 1e3 * statistics.median(dense_s)} | {k: statistics.median(v) for k, v in ratios.items()}
    if args.memory and device.type == "cpu":
        for name, fn in variants.items():
            reset_grads()
            out[f"{name}_mb"] = peak_mb(fn)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--configs", nargs="+", default=["8:512:1024", "64:512:1024", "256:256:512"],
                   help="E:D:H triples (default: 8:512:1024 64:512:1024 256:256:512)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert", choices=["glu", "mlp"], default="glu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts (default: 1 2)")
    p.add_argument("--loop", action="store_true", help="also time a naive per-expert Python loop")
    p.add_argument("--memory", action="store_true",
                   help="also report each variant's peak allocated memory in one step (CPU)")
    p.add_argument("--keep-grads", action="store_true",
                   help="keep gradients between steps (zero_grad(set_to_none=False)) in every variant; moekit "
                        "fuses the accumulation (fuse_grad_accumulation=True)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="skip transformers' Mixtral block (timed when transformers is installed)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available; nothing to do")
        return
    if args.peer:
        try:
            import transformers  # noqa: F401
        except ImportError:
            args.peer = False
    if args.peer and args.expert != "glu":
        raise SystemExit("--expert: transformers' Mixtral block has GLU experts; use --no-peer with mlp")
    dtype = getattr(torch, args.dtype)
    configs = []
    for c in args.configs:
        try:
            E, D, H = (int(v) for v in c.split(":"))
        except ValueError:
            raise SystemExit(f"--configs: expected E:D:H, got {c!r}") from None
        configs.append((E, D, H))
    T, K = args.tokens, args.top_k
    peer = " vs transformers MixtralSparseMoeBlock (grouped_mm experts)" if args.peer else ""
    print(f"forward+backward, time / dense-limit time (median of {args.repeats} interleaved rounds), "
          f"device={device} dtype={args.dtype} T={T} k={K} expert={args.expert} torch={torch.__version__}{peer}")
    print("gradients kept and zeroed in place; moekit fuse_grad_accumulation=True" if args.keep_grads else
          "gradients dropped between steps (zero_grad(set_to_none=True))")
    cols = [f"{'E (D, H)':>16}"]
    for n in args.threads:
        cols += [f"{'dense ms ' + str(n) + 't':>12}", f"{'moekit ' + str(n) + 't':>10}"] + ([f"{'peer ' + str(n) + 't':>9}", f"{'m/p':>5}"]
                                                       if args.peer else [])
        if args.loop:
            cols += [f"{'loop ' + str(n) + 't':>9}"]
    print(" ".join(cols))
    print("-" * len(" ".join(cols)))
    default_threads = torch.get_num_threads()
    mems = []
    for E, D, H in configs:
        row = [f"{f'{E} ({D}, {H})':>16}"]
        first_mem = None
        for n in args.threads:
            torch.set_num_threads(n)
            r = measure(E, D, H, T, K, args, device, dtype)
            first_mem = r if first_mem is None else first_mem
            row += [f"{r['dense_ms']:12.0f}", f"{r['moekit']:10.2f}"]
            if args.peer:
                row += [f"{r['transformers']:9.2f}", f"{r['moekit'] / r['transformers']:5.2f}"]
            if args.loop:
                row.append(f"{r['loop']:9.2f}")
        torch.set_num_threads(default_threads)
        print(" ".join(row), flush=True)
        if args.memory:
            mems.append((f"{E} ({D}, {H})", first_mem))
    if mems:
        names = [k[:-3] for k, v in mems[0][1].items() if k.endswith("_mb")]
        print("\npeak memory allocated during one forward+backward, MiB (" +
              ("gradients kept" if args.keep_grads else "gradients created by the step") + ")")
        print(f"{'E (D, H)':>16} " + " ".join(f"{n:>13}" for n in names))
        for label, r in mems:
            print(f"{label:>16} " + " ".join(f"{r[n + '_mb']:13.0f}" for n in names))


if __name__ == "__main__":
    main()
