"""`moekit run chen2022`: Chen et al. 2022, "Towards Understanding Mixture of Experts in Deep Learning".

Trains, on the synthetic cluster task (REFERENCE.md §7), a single linear / single cubic patch CNN and
a linear / cubic noisy top-1 MoE of 8 experts, R seeds at once, and reports test accuracy, train
accuracy and the MoEs' dispatch entropy (how purely each expert receives one cluster).

Legend: R runs (seeds), N examples, S steps, M experts, K clusters.
"""
from __future__ import annotations

import argparse
import time

import torch

from ..models.chen2022 import (GATES, ChenMoE, ChenSingle, accuracy_R, make_chen_data, train_moe,
                               train_single)
from .base import Experiment, ExperimentResult, Row, RunContext

SETTINGS = {1: dict(sigma_p=1.0, gamma_max=3.0), 2: dict(sigma_p=2.0, gamma_max=3.0)}
# Official notebooks, 10 runs: test accuracy % (mean ± std) and dispatch entropy (REFERENCE.md §7).
PAPER = {
    1: {"single linear": ({"test_acc": 68.3}, {}), "single cubic": ({"test_acc": 79.6}, {}),
        "MoE linear": ({"test_acc": 93.00, "entropy": 1.300}, {"test_acc": 2.11, "entropy": 0.044}),
        "MoE cubic": ({"test_acc": 99.46, "entropy": 0.098}, {"test_acc": 0.55, "entropy": 0.088})},
    2: {"single linear": ({"test_acc": 68.2}, {}), "single cubic": ({"test_acc": 77.4}, {}),
        "MoE linear": ({"test_acc": 89.49, "entropy": 1.262}, {"test_acc": 1.35, "entropy": 0.095}),
        "MoE cubic": ({"test_acc": 98.10, "entropy": 0.183}, {"test_acc": 1.56, "entropy": 0.144})},
}
MODELS = ("single linear", "single cubic", "MoE linear", "MoE cubic")
QUICK = dict(n=2000, seeds=2, moe_steps=300, single_steps=300)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--setting", type=int, choices=sorted(SETTINGS), default=1,
                   help="1: sigma_p=1, gamma_max=3; 2: sigma_p=2, gamma_max=3 (default 1)")
    p.add_argument("--sigma-p", type=float, default=None, help="noise-patch std scale (overrides --setting)")
    p.add_argument("--gamma-max", type=float, default=None, help="feature-noise scale bound (overrides --setting)")
    p.add_argument("--clusters", type=int, default=4, help="K clusters (default 4)")
    p.add_argument("--patches", type=int, default=4, help="P patches per example (default 4)")
    p.add_argument("--dim", type=int, default=50, help="d, the patch dimension (default 50)")
    p.add_argument("--n-train", type=int, default=16000)
    p.add_argument("--n-test", type=int, default=16000)
    p.add_argument("--steps", type=int, default=None,
                   help="max full-batch steps for every model (default: 500 for the MoEs, 800 for the singles)")
    p.add_argument("--experts", type=int, default=8, help="M experts of each MoE (default 8)")
    p.add_argument("--gate", choices=GATES, default="logit",
                   help="MoE gate: 'logit' = the chosen noisy router logit (official code), "
                        "'softmax' = its softmax probability (the paper's pi)")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the data draw shared by all runs")


def _opt(args: argparse.Namespace, name: str, default):
    value = getattr(args, name, None)
    return default if value is None else value


def _gens(seeds: range, stream: int) -> list[torch.Generator]:
    """One generator per run; ``stream`` separates init / training noise / evaluation noise."""
    return [torch.Generator().manual_seed(1000 * s + stream) for s in seeds]


def run(ctx: RunContext) -> ExperimentResult:
    from ..analysis.plots import curves, routing_heatmap
    from ..analysis.routing import dispatch_entropy, routing_table
    from ..analysis.tables import routing_counts_markdown

    args = ctx.args
    setting = int(_opt(args, "setting", 1))
    if setting not in SETTINGS:
        raise ValueError(f"setting: expected one of {sorted(SETTINGS)}, got {setting}")
    sigma_p = float(_opt(args, "sigma_p", SETTINGS[setting]["sigma_p"]))
    gamma_max = float(_opt(args, "gamma_max", SETTINGS[setting]["gamma_max"]))
    K, P, D = int(_opt(args, "clusters", 4)), int(_opt(args, "patches", 4)), int(_opt(args, "dim", 50))
    n_train, n_test = int(_opt(args, "n_train", 16000)), int(_opt(args, "n_test", 16000))
    steps = _opt(args, "steps", None)
    moe_steps, single_steps = (500, 800) if steps is None else (int(steps), int(steps))
    M, gate, data_seed = int(_opt(args, "experts", 8)), _opt(args, "gate", "logit"), int(_opt(args, "data_seed", 0))
    for flag, v in (("--clusters", K), ("--patches", P), ("--dim", D), ("--n-train", n_train), ("--n-test", n_test),
                    ("--experts", M), ("--steps", moe_steps)):
        if v < 1:
            raise ValueError(f"{flag}: must be a positive integer, got {v}")
    for flag, fv in (("--sigma-p", sigma_p), ("--gamma-max", gamma_max)):
        if not fv >= 0:
            raise ValueError(f"{flag}: must be >= 0, got {fv}")
    R = max(1, int(ctx.seeds))
    if ctx.quick:
        n_train, n_test = min(n_train, QUICK["n"]), min(n_test, QUICK["n"])
        R = min(R, QUICK["seeds"])
        moe_steps, single_steps = min(moe_steps, QUICK["moe_steps"]), min(single_steps, QUICK["single_steps"])
    seeds = range(R)

    g_data = torch.Generator().manual_seed(data_seed)
    common = dict(num_clusters=K, num_patches=P, dim=D, sigma_p=sigma_p, gamma_max=gamma_max)
    train = make_chen_data(n_train, generator=g_data, **common)
    test = make_chen_data(n_test, generator=g_data, features=train.vectors, **common)

    rows: list[Row] = []
    losses: dict[str, torch.Tensor] = {}
    tables: dict[str, str] = {}
    notes: list[str] = []
    walls: dict[str, float] = {}
    for stream, name in enumerate(MODELS, start=1):
        activation = name.split()[1]
        t0 = time.perf_counter()
        if name.startswith("single"):
            model = ChenSingle(R, dim=D, filters_per_class=40, activation=activation, generators=_gens(seeds, stream))
            log = train_single(model, train, steps=single_steps, track=ctx.track, description=name)
            with torch.no_grad():
                train_acc, test_acc = accuracy_R(model(train.x_NPD), train.y_N), accuracy_R(model(test.x_NPD), test.y_N)
            metrics = {"test_acc": test_acc.tolist(), "train_acc": train_acc.tolist()}
        else:
            model = ChenMoE(R, dim=D, num_experts=M, filters_per_class=8, activation=activation, gate=gate,
                            generators=_gens(seeds, stream))
            log = train_moe(model, train, steps=moe_steps, generators=_gens(seeds, 10 + stream),
                            track=ctx.track, description=name)
            # evaluation keeps the U[0,1) routing noise, as the official code does (it never leaves train mode)
            eval_gens = _gens(seeds, 20 + stream)
            with torch.no_grad():
                out_train, out_test = model(train.x_NPD, generators=eval_gens), model(test.x_NPD, generators=eval_gens)
            ids_RN = out_train.metrics["expert_ids"]
            entropy = [float(dispatch_entropy(ids_RN[r], train.cluster_N, M, K)) for r in seeds]
            metrics = {"test_acc": accuracy_R(out_test.y, test.y_N).tolist(),
                       "train_acc": accuracy_R(out_train.y, train.y_N).tolist(), "entropy": entropy}
            table_MK = routing_table(ids_RN[0], train.cluster_N, M, K)
            tables[f"{name}: training examples per expert (rows) and cluster (columns), seed 0"] = \
                routing_counts_markdown(torch.as_tensor(table_MK).tolist(), [f"cluster {k + 1}" for k in range(K)])
            fig = routing_heatmap(torch.as_tensor(table_MK).float(), [f"expert {m + 1}" for m in range(M)],
                                  [f"cluster {k + 1}" for k in range(K)],
                                  f"{name}: share of each cluster per expert (seed 0)", normalize="col")
            ctx.savefig(fig, f"routing_{activation}_moe.png")
        walls[name] = time.perf_counter() - t0
        losses[name] = log.losses_RS
        rows.append(Row(name, metrics))
        notes.append(f"{name}: optimiser steps per seed {log.stopped_R.tolist()}, {walls[name]:.1f} s wall")

    for group, title, ylabel in (
            (("single linear", "single cubic"), "Single models: training loss", "cross-entropy of logits"),
            (("MoE linear", "MoE cubic"), "MoEs: training loss", "cross-entropy of softmax output (floor 0.313)")):
        single = group[0].startswith("single")
        fig = curves({nm: losses[nm].numpy() for nm in group}, title, "step", ylabel, logy=single)
        ctx.savefig(fig, "loss_single.png" if single else "loss_moe.png")

    paper_setting = next((s for s, v in SETTINGS.items()
                          if v["sigma_p"] == sigma_p and v["gamma_max"] == gamma_max), None)
    paper: list[Row] = []
    if paper_setting is not None and (K, P, D, M) == (4, 4, 50, 8):
        paper = [Row(nm, dict(m), dict(s)) for nm, (m, s) in PAPER[paper_setting].items()]
    else:
        notes.append("No published numbers for this configuration (the paper uses K=4, P=4, d=50, M=8 and "
                     "sigma_p/gamma_max of setting 1 or 2).")
    notes += [
        "Gate: the chosen expert's output is multiplied by its noisy router logit h_m(x)+r_m (official code: "
        "top1 of the noisy logits, no softmax); --gate softmax uses softmax(h+r)_m, the paper's pi_m.",
        "MoE loss: CrossEntropyLoss applied to softmax(F(x)) (official code: softmax in the forward, then "
        "nn.CrossEntropyLoss), minimum log(1+1/e)=0.313. Routing noise U[0,1) is also used at evaluation.",
        "Early stopping per seed (official rule): stop when the loss is not a new best and either rose more "
        "than 0.02 above the best or is <= 0.314 (MoE); singles: rose more than 0.02 above the best after step 500.",
        f"All seeds share one data draw (data seed {data_seed}), as the paper's 10 runs share one data set; "
        "seeds differ in initialisation and routing noise. Entropy is measured on the training set.",
    ]
    config = dict(setting=setting, sigma_p=sigma_p, gamma_max=gamma_max, clusters=K, patches=P, dim=D,
                  n_train=n_train, n_test=n_test, seeds=R, experts=M, filters_per_class_moe=8,
                  filters_per_class_single=40, moe_steps=moe_steps, single_steps=single_steps, gate=gate,
                  expert_lr=1e-3, router_lr=0.1, single_lr={"linear": 0.003, "cubic": 0.01},
                  weight_decay=5e-4, expert_init_scale=1e-3, data_seed=data_seed, scale=10.0,
                  quick=bool(ctx.quick), threads=torch.get_num_threads())
    return ExperimentResult(rows=rows, paper=paper, config=config, tables=tables, notes=notes)


EXPERIMENT = Experiment(
    name="chen2022",
    paper="Chen, Deng, Wu, Gu & Li 2022, Towards Understanding Mixture of Experts in Deep Learning",
    summary="Synthetic cluster task: a cubic top-1 MoE routes each cluster to one expert and beats linear "
            "MoEs and single models",
    est_time="~6 min",
    run=run,
    add_arguments=add_arguments,
    quick_time="<30 s",
    default_seeds=10,
)
