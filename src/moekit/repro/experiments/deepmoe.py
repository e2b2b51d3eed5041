"""`moekit run deepmoe`: DeepMoE (Wang et al., UAI 2019) on 8×8 digits — accuracy vs executed FLOPs.

A small ResNet (stem + 3 stages of one basic block, widths c/2c/4c, c = 8·width) is trained on the digits
as a plain CNN at several widths (the baseline frontier) and with DeepMoE channel gating in the paper's two
variants, *narrow* (gate the ×1 network) and *wide* (gate the ×2 network), for each sparsity weight λ.
Gated networks train in two phases (paper): jointly with ``CE + λ Σ_l ||g^l||₁ + μ CE_embedding``, then
the base network is fine-tuned with the gating frozen and ``λ = μ = 0``. Plain networks get the same two
phases (same number of updates) without gates.

At evaluation the test images are run ``--eval-batch-size`` at a time (default 1): every input channel
whose gate is zero for the whole batch is sliced out of the activations and the kernel, so the reported
executed FLOPs are what was actually computed (including the embedding network and gate heads).

Legend: T examples, B batch, Y classes; gated layers and seeds are counted in words (see the package legend).
The result key ``zero_L`` (zero-gate fraction per gated layer) keeps its historical name.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from moekit.analysis.tables import markdown_table
from moekit.repro.models.deepmoe_resnet import DeepMoEResNet
from .base import Experiment, ExperimentResult, Row, RunContext, Verdict, mean_std
from .verdicts import Check, Claims, Prerequisite, paired
from .options import config_dict, option
from .train import cosine, fit, seed_generator, seeded_global

VARIANTS = {"narrow": 1.0, "wide": 2.0}


@dataclass(frozen=True)
class Config:
    lambdas: tuple[float, ...] = option((0.0, 0.0003, 0.001, 0.003, 0.005, 0.01, 0.03), "L1 gate weights λ to sweep",
                                        ge=0, nonempty=True, quick=(0.01,))
    epochs: int = option(20, "phase-1 (joint) training epochs", ge=1, quick=4)
    finetune_epochs: int = option(5, "phase-2 epochs, gates frozen, λ = μ = 0", ge=0, quick=1)
    mu: float = option(0.5, "weight μ of the embedding classifier's cross-entropy", ge=0)
    lr: float = option(3e-3, "Adam learning rate of phase 1 (phase 2 uses lr/10; cosine decay in each phase)", gt=0)
    batch_size: int = option(64, "training batch", ge=1)
    base_channels: int = option(8, "c, the stem width of the ×1 network", ge=1)
    plain_widths: tuple[float, ...] = option((0.5, 1.0, 1.5, 2.0), "width multipliers of the plain CNN baseline",
                                             gt=0, nonempty=True, quick=(1.0, 2.0))
    eval_batch_size: int = option(1, "test images per forward at evaluation; channels are skipped when their gate "
                                      "is zero for the whole batch (1: per-image skipping)", ge=1)


def _train_phase(model: DeepMoEResNet, x: Tensor, y: Tensor, *, epochs: int, lr: float, batch_size: int,
                 generator: torch.Generator) -> None:
    """Adam with a per-step cosine decay to 0; loss ``CE + out.aux_loss (λ term) + μ term``."""
    params = [p for p in model.parameters() if p.requires_grad]
    if epochs == 0 or not params:
        return

    def loss_fn(idx: Tensor | None) -> Tensor:
        xb, yb = (x, y) if idx is None else (x[idx], y[idx])
        out = model(xb)
        return F.cross_entropy(out.y, yb) + out.aux_loss + model.embedding_loss(out, yb).aux_loss

    fit(loss_fn, [torch.optim.Adam(params, lr=lr)], epochs=epochs, n=len(y), batch_size=batch_size,
        generator=generator, schedule=cosine, model=model)


@torch.no_grad()
def evaluate(model: DeepMoEResNet, x: Tensor, y: Tensor, batch_size: int) -> dict[str, Any]:
    """Accuracy, gate sparsity and MACs per image over ``x``, run ``batch_size`` images per forward (eval mode)."""
    model.eval()
    T = len(y)
    correct = emb_correct = 0.0
    sums = {"macs_executed": 0.0, "macs_ideal": 0.0, "macs_dense": 0.0}
    zero_per_layer = torch.zeros(len(model.gate_channels), dtype=torch.float64)
    for i in range(0, T, batch_size):
        xb, yb = x[i:i + batch_size], y[i:i + batch_size]
        out = model(xb)
        correct += float((out.y.argmax(-1) == yb).sum())
        for k in sums:
            sums[k] += float(out.metrics[k]) * len(yb)
        if model.gated:
            emb_correct += float((out.embedding_logits.argmax(-1) == yb).sum())
            zero_per_layer += torch.tensor([float((g == 0).sum()) for g in out.gates], dtype=torch.float64)
    res: dict[str, Any] = {"acc": 100.0 * correct / T, **{k: v / T for k, v in sums.items()}}
    if model.gated:
        chans = torch.tensor(model.gate_channels, dtype=torch.float64)
        res["zero_L"] = (zero_per_layer / (T * chans)).tolist()
        res["zero_gates"] = float(zero_per_layer.sum() / (T * chans.sum()))
        res["embedding_acc"] = 100.0 * emb_correct / T
    return res


def _log_x_axis(ax: Any, xs: list[float]) -> None:
    """Log x axis with plain 1-2-5 tick labels (kMACs span more than a decade)."""
    lo, hi = min(xs), max(xs)
    if not (lo > 0 and hi > lo):
        return
    ax.set_xscale("log")
    ticks = [m * 10 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
             for m in (1, 2, 5) if lo / 1.5 <= m * 10 ** e <= hi * 1.5]
    ax.minorticks_off()
    ax.set_xticks(ticks, labels=[f"{t:g}" for t in ticks])


def _findings(rows: list[Row], lambdas: list[float]) -> list[str]:
    """Data-driven lines comparing the gated variants with the plain ×1 CNN (means over seeds)."""
    by = {r.name: r.metrics for r in rows}
    if plain_name(1.0) not in by:
        return []
    acc1 = mean_std(by[plain_name(1.0)]["test_acc"])[0]
    mean = {n: {k: mean_std(v)[0] for k, v in m.items()} for n, m in by.items()}
    out = []
    wide = min(lambdas, key=lambda lam: abs(math.log(max(mean[gated_name("wide", lam)]["flops_vs_plain"], 1e-9))))
    w = mean[gated_name("wide", wide)]
    out.append(f"Ours, wide vs plain ×1 at the λ whose executed FLOPs are closest to the plain ×1 net (λ={wide:g}): "
               f"{w['test_acc']:.2f} % at {w['flops_vs_plain']:.2f}× its FLOPs vs {acc1:.2f} %.")
    ok = [lam for lam in lambdas if mean[gated_name("narrow", lam)]["test_acc"] >= acc1 - 1.0]
    if ok:
        n = mean[gated_name("narrow", max(ok))]
        out.append(f"Ours, narrow: the largest λ within 1 point of the plain ×1 accuracy (λ={max(ok):g}) runs "
                   f"{n['flops_vs_plain']:.2f}× the plain ×1 FLOPs at {n['test_acc']:.2f} % (plain ×1 {acc1:.2f} %).")
    dead = [n for n, m in mean.items() if m.get("zero_gates", 0.0) >= 0.99]
    if dead:
        out.append("All gates closed (≥ 99 % zeros) in: " + "; ".join(dead) + " — only the stem, the 1×1 "
                   "shortcuts, the head and the gating overhead compute there, hence the accuracy drop.")
    return out


def plain_name(width: float) -> str:
    return f"plain CNN ×{width:g}"


def gated_name(variant: str, lam: float) -> str:
    return f"DeepMoE {variant} (×{VARIANTS[variant]:g}) λ={lam:g}"


def run(ctx: RunContext) -> ExperimentResult:
    from moekit.analysis.plots import lines, scatter_xy
    from moekit.repro.datasets.digits import load_digits_split

    c: Config = ctx.config
    o = config_dict(c)
    o["lambdas"], o["plain_widths"] = sorted(c.lambdas), sorted(c.plain_widths)
    num_seeds = ctx.seeds
    jobs: list[tuple[str, str, float, float]] = [(plain_name(w), "plain", w, 0.0) for w in o["plain_widths"]]
    jobs += [(gated_name(v, lam), v, VARIANTS[v], lam) for v in VARIANTS for lam in o["lambdas"]]
    per_seed: dict[str, list[dict[str, Any]]] = {name: [] for name, *_ in jobs}
    walls: dict[str, float] = {name: 0.0 for name, *_ in jobs}
    reference_macs: list[float] = []   # dense MACs of the plain ×1 network, per seed

    work = [(s, job) for s in range(num_seeds) for job in jobs]
    for seed, (name, kind, width, lam) in ctx.track(work, total=len(work), description="deepmoe"):
        data = load_digits_split(seed, images=True)
        stream = jobs.index((name, kind, width, lam))
        gated = kind != "plain"
        with seeded_global(seed, stream=stream):
            model = DeepMoEResNet(width_multiplier=width, base_channels=o["base_channels"], gated=gated,
                                  l1_weight=lam if gated else 0.0, embedding_weight=o["mu"] if gated else 0.0)
        g = seed_generator(seed, stream=100 + stream)
        t0 = time.perf_counter()
        _train_phase(model, data.x_train, data.y_train, epochs=o["epochs"], lr=o["lr"],
                     batch_size=o["batch_size"], generator=g)
        phase1 = evaluate(model, data.x_test, data.y_test, batch_size=len(data.y_test))
        if gated:
            model.freeze_gates()
        _train_phase(model, data.x_train, data.y_train, epochs=o["finetune_epochs"], lr=o["lr"] / 10,
                     batch_size=o["batch_size"], generator=g)
        walls[name] += time.perf_counter() - t0
        res = evaluate(model, data.x_test, data.y_test, batch_size=o["eval_batch_size"])
        res["acc_phase1"] = phase1["acc"]
        res["fullbatch_executed"] = evaluate(model, data.x_test, data.y_test, len(data.y_test))["macs_executed"]
        per_seed[name].append(res)
        if kind == "plain" and width == 1.0:
            reference_macs.append(res["macs_dense"])
    if not reference_macs:   # the ×1 plain CNN was not in --plain-widths: count it without training
        ref = DeepMoEResNet(width_multiplier=1.0, base_channels=o["base_channels"], gated=False)
        reference_macs = [evaluate(ref, data.x_test[:1], data.y_test[:1], 1)["macs_dense"]]
    ref_macs = reference_macs[0]

    rows: list[Row] = []
    for name, kind, width, lam in jobs:
        rs = per_seed[name]
        m: dict[str, Any] = {
            "test_acc": [r["acc"] for r in rs],
            "kmacs": [r["macs_executed"] / 1e3 for r in rs],
            "flops_vs_dense": [r["macs_executed"] / r["macs_dense"] for r in rs],
            "flops_vs_plain": [r["macs_executed"] / ref_macs for r in rs],
        }
        if kind != "plain":
            m["zero_gates"] = [r["zero_gates"] for r in rs]
            m["fullbatch_flops_vs_dense"] = [r["fullbatch_executed"] / r["macs_dense"] for r in rs]
            m["embedding_acc"] = [r["embedding_acc"] for r in rs]
        m["acc_phase1"] = [r["acc_phase1"] for r in rs]
        rows.append(Row(name, m))

    def mean(name: str, key: str) -> float:
        return mean_std(next(r for r in rows if r.name == name).metrics[key])[0]

    def std(name: str, key: str) -> float:
        return mean_std(next(r for r in rows if r.name == name).metrics[key])[1]

    # ---- frontier plot: accuracy vs executed FLOPs, plain widths vs the λ sweeps
    points = {"plain CNN (widths)": ([mean(plain_name(w), "kmacs") for w in o["plain_widths"]],
                                     [mean(plain_name(w), "test_acc") for w in o["plain_widths"]])}
    labels = {"plain CNN (widths)": [f"×{w:g}" for w in o["plain_widths"]]}
    yerr = {"plain CNN (widths)": [std(plain_name(w), "test_acc") for w in o["plain_widths"]]}
    xerr = {"plain CNN (widths)": [std(plain_name(w), "kmacs") for w in o["plain_widths"]]}
    for v in VARIANTS:
        key = f"DeepMoE {v}"
        names = [gated_name(v, lam) for lam in o["lambdas"]]
        points[key] = ([mean(n, "kmacs") for n in names], [mean(n, "test_acc") for n in names])
        yerr[key], xerr[key] = [std(n, "test_acc") for n in names], [std(n, "kmacs") for n in names]
        labels[key] = [f"λ={lam:g}" for lam in o["lambdas"]]
    spread = ", ± std over seeds" if num_seeds > 1 else ""
    fig = scatter_xy(points, f"Digits: test accuracy vs executed FLOPs ({num_seeds} seed{'s' * (num_seeds > 1)}{spread})",
                     "executed kMACs per image (incl. gating overhead)", "test accuracy (%)", annotate=labels,
                     yerr=yerr if num_seeds > 1 else None, xerr=xerr if num_seeds > 1 else None)
    _log_x_axis(fig.axes[0], [x for xs_, _ in points.values() for x in xs_])
    ctx.savefig(fig, "accuracy_vs_flops.png")

    # ---- sparsity vs λ
    lam_pos = [lam for lam in o["lambdas"] if lam > 0]
    xs = lam_pos if len(lam_pos) >= 2 else o["lambdas"]
    series, errs = {}, {}
    for v in VARIANTS:
        for label, key in (("zero-gate fraction", "zero_gates"), ("executed / dense FLOPs", "flops_vs_dense")):
            series[f"{v}: {label}"] = [mean(gated_name(v, lam), key) for lam in xs]
            errs[f"{v}: {label}"] = [std(gated_name(v, lam), key) for lam in xs]
    fig = lines(xs, series, "DeepMoE: gate sparsity and executed FLOPs vs λ" + (" (± std over seeds)" if num_seeds > 1 else ""),
                "λ (L1 gate weight)", "fraction", logx=len(lam_pos) >= 2, yerr=errs if num_seeds > 1 else None)
    ctx.savefig(fig, "sparsity_vs_lambda.png")

    # ---- per-layer zero-gate fractions (seed 0)
    layer_names = [f"conv{i} ({c}·w)" for i, c in enumerate(
        DeepMoEResNet(width_multiplier=1.0, base_channels=o["base_channels"]).gate_channels)]
    table_rows = [[name] + [f"{z:.2f}" for z in per_seed[name][0]["zero_L"]]
                  for name, kind, *_ in jobs if kind != "plain"]
    tables = {"Fraction of zero gates per gated conv on the test set (seed 0; columns: input channels at ×1)":
              markdown_table(["model"] + layer_names, table_rows)}

    notes = [
        "Paper (Wang et al. 2019, the wide and narrow DeepMoE variants; qualitative claims only, no numbers are "
        "compared — docs/papers.md): the wide variant (double the channels, then gate) reaches higher accuracy at "
        "about the same executed FLOPs as the original network; the narrow variant (gate the original width: "
        "dynamic channel pruning) needs fewer FLOPs at about the same accuracy. Compare 'DeepMoE wide' against "
        "'plain CNN ×1' and 'DeepMoE narrow' against its λ=0 row and the plain ×1 row; the paper rows are left "
        "empty.",
        "FLOPs are multiply-accumulates per image, as executed with --eval-batch-size "
        f"{o['eval_batch_size']}{' (per-image skipping)' if o['eval_batch_size'] == 1 else ''}, including the "
        "shallow embedding network and the gate heads; flops_vs_plain "
        f"divides by the dense plain ×1 CNN ({ref_macs / 1e3:.1f} kMACs); flops_vs_dense by the same gated "
        "network with every channel computed. fullbatch_flops_vs_dense: executed FLOPs when the whole test "
        "set is one batch (a channel is skipped only if its gate is zero for every image).",
        f"Digits test set: 450 images, so one image is 0.22 points of accuracy. Phase 1: {o['epochs']} epochs "
        f"Adam lr {o['lr']:g}, cosine; phase 2: {o['finetune_epochs']} epochs at lr {o['lr'] / 10:g} with the "
        "embedding and gate heads frozen and λ = μ = 0 (plain CNNs: the same two phases). acc_phase1 is the "
        "test accuracy before fine-tuning.",
        "Architecture: no batch norm (a BN after a gated conv would cancel a common rescaling of the gates, "
        "letting the L1 term shrink them for free); gate heads carry a bias initialised to 1 so training "
        "starts with open gates (the paper's g = ReLU(W e) has none).",
        *_findings(rows, o["lambdas"]),
        "Wall time per model (all seeds, training only): " + ", ".join(f"{n}: {t:.1f} s" for n, t in walls.items()),
    ]
    config = dict(lambdas=o["lambdas"], epochs=o["epochs"], finetune_epochs=o["finetune_epochs"], mu=o["mu"],
                  lr=o["lr"], finetune_lr=o["lr"] / 10, batch_size=o["batch_size"], base_channels=o["base_channels"],
                  plain_widths=o["plain_widths"], eval_batch_size=o["eval_batch_size"], seeds=num_seeds,
                  variants=dict(VARIANTS), blocks_per_stage=[1, 1, 1], embed_dim=32, embed_channels=[8, 16],
                  gate_bias_init=1.0, optimizer="Adam, cosine decay per phase",
                  data="digits 8x8, split seed = run seed",
                  quick=bool(ctx.quick), threads=torch.get_num_threads())
    return ExperimentResult(rows=rows, paper=[], config=config, tables=tables, notes=notes,
                            verdicts=_verdicts(rows, o["lambdas"], o["plain_widths"]))


def _verdicts(rows: list[Row], lambdas: list[float], widths: list[float]) -> list[Verdict]:
    """The paper's two claims, graded from per-seed numbers paired with the plain ×1 CNN of the same seed.
    The λ of each claim is picked by executed FLOPs (not by test accuracy)."""
    by = {r.name: r.metrics for r in rows}
    if plain_name(1.0) not in by:
        return []
    acc1 = by[plain_name(1.0)]["test_acc"]
    claims = Claims()
    widest = max(widths)
    if widest > 1.0:
        base = Prerequisite.from_check(
            "a base network that is not saturated (a wider plain CNN is more accurate)",
            Check(f"plain ×{widest:g} − plain ×1 (paired)", paired(by[plain_name(widest)]["test_acc"], acc1),
                  reproduced=0.0, partly=0.0, unit="points"))
    else:
        base = Prerequisite("a base network that is not saturated (a wider plain CNN is more accurate)", None,
                            "no plain width above ×1 in --plain-widths")

    def mean_flops(variant: str, lam: float) -> float:
        v = by[gated_name(variant, lam)]["flops_vs_plain"]
        return sum(v) / len(v)
    wide = min(lambdas, key=lambda lam: abs(math.log(max(mean_flops("wide", lam), 1e-9))))
    w = by[gated_name("wide", wide)]
    claims.grade(
        "Wide DeepMoE (double the channels, then gate) is more accurate than the original network at about the "
        "same executed FLOPs",
        [Check(f"wide (λ={wide:g}) − plain ×1 accuracy (paired)", paired(w["test_acc"], acc1), reproduced=0.0,
               partly=0.0, unit="points"),
         Check(f"wide (λ={wide:g}) executed FLOPs / plain ×1", w["flops_vs_plain"], reproduced=1.2, partly=1.5,
               higher=False)],
        [base])
    narrow = min(lambdas, key=lambda lam: abs(mean_flops("narrow", lam) - 0.8))   # the paper-like 20 % saving
    n = by[gated_name("narrow", narrow)]
    claims.grade(
        "Narrow DeepMoE (gate the original width) needs fewer FLOPs at about the same accuracy",
        [Check(f"narrow (λ={narrow:g}, FLOPs nearest 0.8×) executed FLOPs / plain ×1", n["flops_vs_plain"],
               reproduced=0.8, partly=1.0, higher=False),
         Check(f"plain ×1 − narrow (λ={narrow:g}) accuracy (paired)", paired(acc1, n["test_acc"]), reproduced=1.0,
               partly=2.0, higher=False, unit="points")])
    return claims.verdicts


EXPERIMENT = Experiment(
    name="deepmoe",
    paper="Wang et al. 2019, Deep Mixture of Experts via Shallow Embedding (UAI 2019)",
    summary="Channel-gated ResNet on digits: λ sweep of accuracy vs executed FLOPs, wide and narrow vs plain CNN",
    est_time="~7 min",
    default_seeds=3,
    run=run,
    config=Config,
    quick_time="<30 s",
)
