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
GPU suite (``--gpu-suite``, bf16 on CUDA): the configurations E=8 (4096, 14336) k=2 T=8192, E=8 (2048, 5632)
k=2 T=8192, E=64 (2048, 1024) k=8, E=128 (2048, 768) k=8 and E=256 (2048, 512) k=8 at T=16384, each with the
dense limit (ms, TFLOP/s), moekit eager, moekit under ``torch.compile`` and transformers' grouped_mm block:
ratio to the dense limit and TFLOP/s of each, m/p for eager and compiled moekit, and the peak memory of one
step of each variant (``torch.cuda.max_memory_allocated``, reset before each). TFLOP/s count the expert
GEMMs only (``18·T·k·D·H`` for a forward+backward of a GLU bank with input gradients), the same work
for every variant. ``--tiny`` runs the suite's code at toy sizes (for checking it on CPU).

    python benchmarks/moe_layer.py --gpu-suite                      # CUDA, bfloat16
    python benchmarks/moe_layer.py --profile --device cuda --dtype bfloat16 --tokens 16384 --top-k 8 \
        --configs 256:2048:512

``--profile`` runs torch.profiler over ``--profile-steps`` steps of moekit (and transformers' block) on
the first configuration and prints the top operators/kernels by self device time (CUDA) or self CPU
time (CPU), per step.
Legend: T tokens, D dim, H hidden, E experts, K top-k.
"""
from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch
import torch.nn.functional as F

import moekit


class _threads:
    """Run a block with ``n`` torch CPU threads."""

    def __init__(self, n: int):
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self):
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        torch.set_num_threads(self.before)


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
    with torch.device(device):                   # built where it runs: no host copy of large weights
        block = MixtralSparseMoeBlock(cfg)
    with torch.no_grad():
        for p in block.parameters():
            torch.nn.init.normal_(p, std=p.shape[-1] ** -0.5)
    layer = from_hf(block)
    layer.experts.fuse_grad_accumulation = layer_like.get("fuse", False)
    return block.to(device=device, dtype=dtype).train(), layer.to(device=device, dtype=dtype).train()


def _peer_works(transformers) -> bool:
    """Whether this transformers has the Mixtral block with grouped_mm experts (transformers >= 5) and
    moekit converts it; says why not otherwise."""
    major = int(transformers.__version__.split(".")[0])
    if major < 5:
        print(f"transformers {transformers.__version__}: no grouped_mm experts implementation (needs >= 5); "
              f"its columns are left out")
        return False
    try:
        block, layer = peer_block({"D": 8, "H": 8, "E": 2, "K": 1}, torch.device("cpu"), torch.float32)
        peer_step(block, torch.randn(4, 8))
        moe_step(layer, torch.randn(4, 8))
    except Exception as e:                          # an API this script does not know: leave the peer out
        print(f"transformers {transformers.__version__}: its Mixtral block does not run here "
              f"({type(e).__name__}: {str(e).splitlines()[0][:100]}); its columns are left out")
        return False
    return True


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


# ---- GPU suite --------------------------------------------------------------------------------------
# (E, D, H, K, T): Mixtral 8x7B, a small 8-expert layer, OLMoE-, Qwen3-30B-A3B- and a 256-expert fine-grained layer
GPU_SUITE = [(8, 4096, 14336, 2, 8192), (8, 2048, 5632, 2, 8192), (64, 2048, 1024, 8, 16384),
             (128, 2048, 768, 8, 16384), (256, 2048, 512, 8, 16384)]
TINY_SUITE = [(8, 64, 128, 2, 256), (16, 64, 32, 4, 512)]
SUITE_VARIANTS = ["dense", "moekit", "compiled", "transformers"]


def expert_flops(T: int, K: int, D: int, H: int) -> float:
    """Forward+backward FLOPs of a GLU expert bank on T·K routed rows with input gradients: the forward is
    ``2·A·D·2H + 2·A·H·D = 6·A·D·H``, the backward twice that (input and weight gradients)."""
    return 18.0 * T * K * D * H


def cuda_peak_mb(fn, device) -> tuple[float, float]:
    """(peak allocated MiB during ``fn``, the part of it above what was allocated before): from
    ``torch.cuda.max_memory_allocated`` after a reset of the peak statistics."""
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device)
    return peak / 2**20, (peak - before) / 2**20


def suite_variants(E, D, H, T, K, args, device, dtype):
    """The suite's step functions (name -> fn) on one configuration, and the function that drops their
    gradients. moekit and transformers share weights and routing (``moekit.hf.from_hf``); the compiled
    variant is the same moekit layer under ``torch.compile``."""
    torch.manual_seed(0)
    block = None
    if args.peer:
        block, layer = peer_block({"D": D, "H": H, "E": E, "K": K}, device, dtype)
    else:
        with torch.device(device):
            layer = moekit.MoE(D, H, E, top_k=K, expert="glu")
        layer = layer.to(dtype=dtype)
    compiled = torch.compile(layer, backend=args.compile_backend)
    x_TD = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    w1 = layer.experts.w_in[0].detach().clone().requires_grad_()
    w2 = layer.experts.w_out[0].detach().clone().requires_grad_()
    x_AD = torch.randn(T * K, D, device=device, dtype=dtype, requires_grad=True)
    variants = {"dense": lambda: dense_step(x_AD, w1, w2, "glu"), "moekit": lambda: moe_step(layer, x_TD),
                "compiled": lambda: moe_step(compiled, x_TD)}
    if block is not None:
        variants["transformers"] = lambda: peer_step(block, x_TD)

    def reset_grads():
        layer.zero_grad(set_to_none=True)
        if block is not None:
            block.zero_grad(set_to_none=True)
        for v in (w1, w2, x_AD, x_TD):
            v.grad = None
    return variants, reset_grads


def measure_suite(E, D, H, T, K, args, device, dtype) -> dict[str, float]:
    """Median milliseconds per variant over interleaved rounds, and each variant's peak memory of one step."""
    variants, reset_grads = suite_variants(E, D, H, T, K, args, device, dtype)
    for fn in variants.values():        # warm-up (compilation of the compiled variant happens here)
        reset_grads()
        fn()
        reset_grads()
        fn()
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            reset_grads()
            times[name].append(timed(fn, device))
    out = {f"{k}_ms": 1e3 * statistics.median(v) for k, v in times.items()}
    for name, fn in variants.items():
        reset_grads()
        if device.type == "cuda":
            out[f"{name}_peak_mb"], out[f"{name}_step_mb"] = cuda_peak_mb(fn, device)
        else:
            out[f"{name}_peak_mb"] = out[f"{name}_step_mb"] = peak_mb(fn)
    reset_grads()
    return out


def _tflops(flops: float, ms: float) -> str:
    """TFLOP/s in six characters (toy sizes on CPU run at a few GFLOP/s)."""
    v = flops / (ms * 1e-3) / 1e12
    return f"{v:6.1f}" if v >= 10 else f"{v:6.2f}" if v >= 0.01 else f"{v:6.0e}"


def run_suite(args, device, dtype) -> None:
    configs = TINY_SUITE if args.tiny else GPU_SUITE
    peer = "transformers MixtralSparseMoeBlock (grouped_mm experts)" if args.peer else "none (transformers left out)"
    print(f"GPU suite: forward+backward with input gradients, median of {args.repeats} interleaved rounds, "
          f"device={device} dtype={args.dtype} torch={torch.__version__}; compiled = torch.compile(layer, "
          f"backend={args.compile_backend!r}); peer = {peer}")
    print("ratio = time / dense-limit time; TF/s = expert GEMM FLOPs (18·T·k·D·H) / time; "
          "m/p = moekit time / transformers time")
    head = (f"{'E (D, H) k T':>24} {'dense ms':>9} {'TF/s':>6} {'eager':>6} {'TF/s':>6} {'compiled':>8} {'TF/s':>6} "
            f"{'transf.':>7} {'TF/s':>6} {'m/p':>5} {'mc/p':>5}")
    print(head)
    print("-" * len(head))
    mems = []
    for E, D, H, K, T in configs:
        label = f"{E} ({D}, {H}) {K} {T}"
        try:
            r = measure_suite(E, D, H, T, K, args, device, dtype)
        except torch.OutOfMemoryError as e:
            print(f"{label:>24} out of memory: {str(e).splitlines()[0][:80]}", flush=True)
            continue
        finally:
            torch._dynamo.reset()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        flops = expert_flops(T, K, D, H)

        def cell(name, width):
            ms = r.get(f"{name}_ms")
            if ms is None:
                return f"{'-':>{width}} {'-':>6}"
            return f"{ms / r['dense_ms']:{width}.2f} {_tflops(flops, ms)}"
        row = [f"{label:>24}", f"{r['dense_ms']:9.2f} {_tflops(flops, r['dense_ms'])}",
               cell("moekit", 6), cell("compiled", 8), cell("transformers", 7)]
        if "transformers_ms" in r:
            row += [f"{r['moekit_ms'] / r['transformers_ms']:5.2f}", f"{r['compiled_ms'] / r['transformers_ms']:5.2f}"]
        else:
            row += [f"{'-':>5}", f"{'-':>5}"]
        print(" ".join(row), flush=True)
        mems.append((label, r))
    if mems:
        names = [n for n in SUITE_VARIANTS if f"{n}_peak_mb" in mems[0][1]]
        what = ("torch.cuda.max_memory_allocated, reset before each variant; in brackets the part above the "
                "memory allocated before the step" if device.type == "cuda" else "CPU allocator, one step")
        print(f"\npeak memory of one forward+backward, MiB ({what})")
        print(f"{'E (D, H) k T':>24} " + " ".join(f"{n:>19}" for n in names))
        for label, r in mems:
            if device.type == "cuda":
                cells = [f"{r[n + '_peak_mb']:10.0f} ({r[n + '_step_mb']:6.0f})" for n in names]
            else:
                cells = [f"{r[n + '_peak_mb']:19.1f}" for n in names]
            print(f"{label:>24} " + " ".join(cells))


# ---- profile -----------------------------------------------------------------------------------------
def run_profile(args, device, dtype, E, D, H, T, K) -> None:
    """torch.profiler over ``args.profile_steps`` steps of moekit (and transformers' block), after warm-up;
    the top entries by self device time (CUDA) or self CPU time (CPU), per step."""
    from torch.profiler import ProfilerActivity, profile
    torch.manual_seed(0)
    if args.peer:
        block, layer = peer_block({"D": D, "H": H, "E": E, "K": K}, device, dtype)
    else:
        block = None
        with torch.device(device):
            layer = moekit.MoE(D, H, E, top_k=K, expert=args.expert)
        layer = layer.to(dtype=dtype)
    x_TD = torch.randn(T, D, device=device, dtype=dtype, requires_grad=True)
    variants = {"moekit": lambda: moe_step(layer, x_TD)}
    if block is not None:
        variants["transformers"] = lambda: peer_step(block, x_TD)
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    n = args.profile_steps

    def step(fn):
        for m in (layer, block):
            if m is not None:
                m.zero_grad(set_to_none=True)
        x_TD.grad = None
        fn()
    for name, fn in variants.items():
        for _ in range(2):                               # warm-up
            step(fn)
        _sync(device)
        with profile(activities=activities) as prof:
            for _ in range(n):
                step(fn)
            _sync(device)
        events = list(prof.key_averages())
        if cuda:       # the kernels themselves (operators also report the device time of what they launch)
            key = lambda e: getattr(e, "self_device_time_total", None) or getattr(e, "self_cuda_time_total", 0)
            events = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
            what = "self device time of the kernels"
        else:
            key = lambda e: e.self_cpu_time_total
            what = "self CPU time"
        events = [e for e in events if key(e) > 0]
        total_ms = sum(key(e) for e in events) / n / 1e3
        print(f"== profile {name}: E={E} D={D} H={H} T={T} k={K} {args.dtype} on {device}: "
              f"{total_ms:.3f} ms/step of {what} over {n} steps; top {args.profile_top}")
        print(f"{'ms/step':>10} {'share':>6} {'calls/step':>10}  name")
        for e in sorted(events, key=key, reverse=True)[:args.profile_top]:
            ms = key(e) / n / 1e3
            print(f"{ms:10.3f} {ms / max(total_ms, 1e-12):6.1%} {e.count / n:10.1f}  {e.key[:120]}")
        print(flush=True)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--configs", nargs="+", default=["8:512:1024", "64:512:1024", "256:256:512"],
                   help="E:D:H triples (default: 8:512:1024 64:512:1024 256:256:512)")
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--expert", choices=["glu", "mlp"], default="glu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default=None, help="default: cpu; cuda with --gpu-suite")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="default: float32; bfloat16 with --gpu-suite")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="torch CPU thread counts (default: 1 2)")
    p.add_argument("--loop", action="store_true", help="also time a naive per-expert Python loop")
    p.add_argument("--memory", action="store_true",
                   help="also report each variant's peak allocated memory in one step (CPU)")
    p.add_argument("--keep-grads", action="store_true",
                   help="keep gradients between steps (zero_grad(set_to_none=False)) in every variant; moekit "
                        "fuses the accumulation (fuse_grad_accumulation=True)")
    p.add_argument("--no-peer", dest="peer", action="store_false",
                   help="skip transformers' Mixtral block (timed when transformers is installed)")
    p.add_argument("--gpu-suite", action="store_true",
                   help="the GPU configuration table (eager, compiled, transformers, TFLOP/s, peak memory)")
    p.add_argument("--tiny", action="store_true", help="--gpu-suite at toy sizes (checks the code path on CPU)")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend of the compiled variant")
    p.add_argument("--profile", action="store_true",
                   help="profile a few steps of the first configuration and print the top kernels instead")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--profile-top", type=int, default=15)
    args = p.parse_args(argv)
    if args.tiny and not args.gpu_suite:
        raise SystemExit("--tiny: only with --gpu-suite")
    if args.gpu_suite and args.profile:
        raise SystemExit("--gpu-suite, --profile: run one at a time")
    for name in ("repeats", "profile_steps", "profile_top"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(args, name)}")
    args.device = args.device or ("cuda" if args.gpu_suite else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.gpu_suite else "float32")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA not available; nothing to do")
        return
    if args.peer:
        try:
            import transformers
        except ImportError:
            args.peer = False
        else:
            if (args.gpu_suite or args.profile) and not _peer_works(transformers):
                args.peer = False
    if args.peer and args.expert != "glu":
        raise SystemExit("--expert: transformers' Mixtral block has GLU experts; use --no-peer with mlp")
    dtype = getattr(torch, args.dtype)
    if args.gpu_suite:
        if args.expert != "glu":
            raise SystemExit("--expert: the GPU suite measures GLU experts; leave --expert glu")
        run_suite(args, device, dtype)
        return
    configs = []
    for c in args.configs:
        try:
            E, D, H = (int(v) for v in c.split(":"))
        except ValueError:
            raise SystemExit(f"--configs: expected E:D:H, got {c!r}") from None
        configs.append((E, D, H))
    T, K = args.tokens, args.top_k
    if args.profile:
        E, D, H = configs[0]
        with nullcontext() if device.type == "cuda" else _threads(args.threads[0]):
            run_profile(args, device, dtype, E, D, H, T, K)
        return
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
