"""Training-step time of the Shazeer et al. 2017 MoE language models against the compute-matched dense one.

One training step = forward + cross-entropy + backward + Adam update of a :class:`moekit.repro.models.ShazeerLM`
on a batch of B sequences of L bytes. The dense baseline is ``4xLSTM`` (the MoE layer replaced by two more
LSTM layers: the same ops per time step); the MoE models are flat ``MoE-256`` (k = 4) and hierarchical
``MoE-1024-h`` (32 groups × 32 experts, k = 2 · 2), plus ``MoE-4`` (all 4 experts active: the MoE
machinery with no sparsity). All models run interleaved in one process; the table reports medians,
the step-time ratio and the parameter ratio to the dense model, and where each step's time goes:

  * fwd / bwd / adam — the three phases of the whole step;
  * block f+b — forward + backward of the middle block alone (the MoE layer, or the two extra LSTM
    layers of the dense model) on the same activations, so "block" minus the dense "block" is what
    the MoE costs beyond the compute it replaces;
  * adam — proportional to the parameter count: every expert's weights are updated every step.

    python benchmarks/lm_step.py                              # CPU, float32, D=128, B=128, L=64
    python benchmarks/lm_step.py --dim 64 --batch 32          # the shazeer-lm experiment's size
    python benchmarks/lm_step.py --device cuda

Measured (float32, one thread of a 2-core CPU shared with other jobs, so ±20 %): at D=128, T=8192 MoE-256
took 2.1× the 4xLSTM step at 29× its parameters and MoE-1024-h 10× at 114×; at D=256, T=4096 MoE-256 took
2.0× at 31× (MoE-4: 1.3×). Fused Adam over all experts is under 10 % of a step; the time goes to the MoE
layer itself: with 4 experts and no sparsity it already costs 2.2–2.6× the two oneDNN LSTM layers of
the same multiply-adds (routing, sorting, gathering and scattering T·k rows), 256 experts add the noisy
gate over E logits per token and per-expert matmuls of few rows each, and the hierarchical layer's
per-group load loop fills a (T, groups, experts-per-group) gradient for every group in the backward.

Legend: B sequences, L time steps, T = B·L tokens, D model dim, E experts.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from moekit.repro.models.shazeer_lm import ShazeerLM

MODELS = {
    "4xLSTM": dict(block="lstm", extra_lstm_layers=2),
    "MoE-4": dict(block="moe", num_experts=4, top_k=4),
    "MoE-256": dict(block="moe", num_experts=256, top_k=4),
    "MoE-1024-h": dict(block="hmoe", num_groups=32, experts_per_group=32, top_k=2),
}
DENSE = "4xLSTM"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _middle_fb(model: ShazeerLM, h_BLD: torch.Tensor) -> None:
    """Forward + backward of the middle block alone (MoE layer or the extra LSTM layers)."""
    h = h_BLD.detach().requires_grad_()
    if model.middle is not None:
        out = model.middle(h)
        (out.y.sum() + out.aux_loss).backward()
    else:
        y = h
        for lstm in model.middle_lstms:
            y = y + lstm(y)[0]
        y.sum().backward()


def bench(models: dict[str, ShazeerLM], opts: dict[str, torch.optim.Optimizer], x_BL, y_BL, repeats: int,
          device: torch.device) -> dict[str, dict[str, float]]:
    """Median seconds per phase for every model, the models interleaved within each repeat."""
    times: dict[str, dict[str, list[float]]] = {n: {k: [] for k in ("step", "fwd", "bwd", "adam", "block")}
                                                for n in models}
    with torch.no_grad():
        h_BLD = {n: m.lstms[0](m.embed(x_BL))[0] for n, m in models.items()}
    for rep in range(repeats + 1):                   # the first round warms up and is not counted
        for name, model in models.items():
            opt = opts[name]
            _sync(device)
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            out = model(x_BL)
            loss = F.cross_entropy(out.y.reshape(-1, model.vocab_size), y_BL.reshape(-1)) + out.aux_loss
            _sync(device)
            t1 = time.perf_counter()
            loss.backward()
            _sync(device)
            t2 = time.perf_counter()
            opt.step()
            _sync(device)
            t3 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            _middle_fb(model, h_BLD[name])
            _sync(device)
            t4 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            if rep:
                for k, v in (("step", t3 - t0), ("fwd", t1 - t0), ("bwd", t2 - t1), ("adam", t3 - t2),
                             ("block", t4 - t3)):
                    times[name][k].append(v)
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=128, help="model dim D (experts D→2D→D)")
    p.add_argument("--batch", type=int, default=128, help="sequences per step B")
    p.add_argument("--seq-len", type=int, default=64, help="time steps per sequence L")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--fused-adam", action=argparse.BooleanOptionalAction, default=True,
                   help="torch's fused Adam kernel (one pass over each parameter)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--profile", choices=list(MODELS), default=None,
                   help="also print the torch profiler's top operators of this model's training step")
    a = p.parse_args(argv)
    for flag, v in (("--dim", a.dim), ("--batch", a.batch), ("--seq-len", a.seq_len), ("--repeats", a.repeats),
                    ("--threads", a.threads)):
        if v < 1:
            p.error(f"{flag}: must be a positive int, got {v}")
    if DENSE not in a.models:
        a.models = [DENSE, *a.models]
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    torch.manual_seed(0)
    models = {n: ShazeerLM(256, a.dim, **MODELS[n]).to(device) for n in a.models}
    opts = {n: torch.optim.Adam(m.parameters(), lr=1e-3, fused=a.fused_adam) for n, m in models.items()}
    ids = torch.randint(256, (a.batch, a.seq_len + 1), device=device)
    t = bench(models, opts, ids[:, :-1], ids[:, 1:], a.repeats, device)

    T = a.batch * a.seq_len
    dense_cost = models[DENSE].cost()
    print(f"ShazeerLM training step, {device.type}, float32, D={a.dim}, B={a.batch}, L={a.seq_len} (T={T} tokens), "
          f"{a.threads} thread(s), {'fused ' if a.fused_adam else ''}Adam, median of {a.repeats}")
    head = (f"{'model':<11} {'ops/tstep':>9} {'params':>11} {'x params':>8} {'step ms':>8} {'x time':>7} "
            f"{'fwd':>7} {'bwd':>7} {'adam':>7} {'block f+b':>9}")
    print(head)
    print("-" * len(head))
    for n, m in models.items():
        c = m.cost()
        r = t[n]
        print(f"{n:<11} {c.ops_per_timestep:>9,} {c.params_total:>11,} {c.params_total / dense_cost.params_total:>8.1f} "
              f"{1e3 * r['step']:>8.1f} {r['step'] / t[DENSE]['step']:>7.2f} {1e3 * r['fwd']:>7.1f} "
              f"{1e3 * r['bwd']:>7.1f} {1e3 * r['adam']:>7.1f} {1e3 * r['block']:>9.1f}")
    print("\nWhere the extra time of each MoE model goes (ms per step, vs the dense model):")
    for n in models:
        if n == DENSE:
            continue
        r, d = t[n], t[DENSE]
        extra, block, adam = r["step"] - d["step"], r["block"] - d["block"], r["adam"] - d["adam"]
        print(f"  {n:<11} +{1e3 * extra:7.1f} ms: middle block f+b {1e3 * block:+7.1f}, Adam {1e3 * adam:+7.1f}, "
              f"rest {1e3 * (extra - block - adam):+7.1f}")
    if a.profile is not None:
        profile_step(models[a.profile], opts[a.profile], ids[:, :-1], ids[:, 1:], a.profile)


def profile_step(model: ShazeerLM, opt: torch.optim.Optimizer, x_BL, y_BL, name: str, steps: int = 3) -> None:
    """The operators that take the most time in ``steps`` training steps, with their input shapes."""
    from torch.profiler import ProfilerActivity, profile

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        out = model(x_BL)
        (F.cross_entropy(out.y.reshape(-1, model.vocab_size), y_BL.reshape(-1)) + out.aux_loss).backward()
        opt.step()
    step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        for _ in range(steps):
            step()
    print(f"\nTop operators of {steps} {name} training steps (self CPU time, grouped by input shape):")
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=10,
                                                             max_name_column_width=28, max_shapes_column_width=60))


if __name__ == "__main__":
    main()
