"""`moekit run chen2022`: Chen, Deng, Wu, Gu & Li 2022, "Towards Understanding Mixture of Experts in Deep Learning".

Trains, on the synthetic cluster task (:mod:`moekit.repro.datasets.chen_clusters`), a single linear / single
cubic patch CNN and a linear / cubic noisy top-1 MoE of 8 experts, all seeds at once, and reports test
accuracy, train accuracy and the MoEs' dispatch entropy (how purely each expert receives one cluster).
The losses, optimisers and early-stopping rule follow the authors' official code.

Legend: T examples, Y = 2 classes; runs (seeds), experts, steps and clusters are counted in words
(see the package legend). K clusters, P patches, d (``D``) patch dim and M experts are the paper's symbols, kept
in its formulas, the notes and the ``K, P, D, M`` configuration locals. The public names with a leading run
axis keep their historical letters: :func:`single_loss_R`, :func:`moe_loss_R` and :func:`accuracy_R` return
one value per run, their arguments ``logits_RNC``/``out_RNC`` are (runs, T, Y) and ``y_N`` is (T,); the
:class:`~moekit.repro.datasets.chen_clusters.ChenData` fields keep theirs too.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Literal, Sequence

import torch
from torch import Tensor

from moekit.repro.datasets.chen_clusters import ChenData, make_chen_data
from moekit.repro.models.chen2022 import ChenMoE, ChenSingle
from .base import Experiment, ExperimentResult, Row, RunContext, Source, Verdict
from .verdicts import Check, Claims, paired
from .options import OptionError, config_dict, option
from .train import EarlyStop, RunAdam, RunNormalizedGD, RunSGD, TrainLog, fit, seed_generator

SETTINGS = {1: dict(sigma_p=1.0, gamma_max=3.0), 2: dict(sigma_p=2.0, gamma_max=3.0)}
SOURCE = Source("Chen et al. 2022", "official code's result notebooks, 10 runs (the paper's synthetic-data table)",
                "code")
# test accuracy % (mean ± std over 10 runs) and dispatch entropy
PAPER = {
    1: {"single linear": ({"test_acc": 68.3}, {}), "single cubic": ({"test_acc": 79.6}, {}),
        "MoE linear": ({"test_acc": 93.00, "entropy": 1.300}, {"test_acc": 2.11, "entropy": 0.044}),
        "MoE cubic": ({"test_acc": 99.46, "entropy": 0.098}, {"test_acc": 0.55, "entropy": 0.088})},
    2: {"single linear": ({"test_acc": 68.2}, {}), "single cubic": ({"test_acc": 77.4}, {}),
        "MoE linear": ({"test_acc": 89.49, "entropy": 1.262}, {"test_acc": 1.35, "entropy": 0.095}),
        "MoE cubic": ({"test_acc": 98.10, "entropy": 0.183}, {"test_acc": 1.56, "entropy": 0.144})},
}
MODELS = ("single linear", "single cubic", "MoE linear", "MoE cubic")
# Cross-entropy of softmax-probabilities (the official MoE loss) is bounded below by
# -log(e / (e + 1)) = log(1 + 1/e) ≈ 0.31326; the official code stops once it is within 0.0007.
MOE_LOSS_FLOOR = 0.314
MOE_STEPS, SINGLE_STEPS = 500, 800


@dataclass(frozen=True)
class Config:
    setting: Literal[1, 2] = option(1, "1: sigma_p=1, gamma_max=3; 2: sigma_p=2, gamma_max=3")
    sigma_p: float | None = option(None, "noise-patch std scale; none = the --setting's", ge=0)
    gamma_max: float | None = option(None, "feature-noise scale bound; none = the --setting's", ge=0.5)
    clusters: int = option(4, "K clusters", ge=2)
    patches: int = option(4, "P patches per example", ge=3)
    dim: int = option(50, "d, the patch dimension", ge=1)
    n_train: int = option(16000, "training examples", ge=1, quick=2000)
    n_test: int = option(16000, "test examples", ge=1, quick=2000)
    steps: int | None = option(None, f"max full-batch steps of every model; none = {MOE_STEPS} for the MoEs, "
                                     f"{SINGLE_STEPS} for the singles", ge=1, quick=300)
    experts: int = option(8, "M experts of each MoE", ge=1)
    gate: Literal["logit", "softmax"] = option(
        "logit", "MoE gate: 'logit' = the chosen noisy router logit (official code), 'softmax' = its softmax "
                 "probability (the paper's pi)")
    data_seed: int = option(0, "seed of the data draw shared by all runs", ge=0)

    def check(self) -> None:
        if 2 * self.clusters > self.dim:
            raise OptionError("--clusters", f"need 2 x --clusters <= --dim ({self.dim}) for orthonormal features "
                                            f"and centres, got {self.clusters}")

    @property
    def noise(self) -> tuple[float, float]:
        """(sigma_p, gamma_max) after the --setting defaults."""
        s = SETTINGS[self.setting]
        return (s["sigma_p"] if self.sigma_p is None else self.sigma_p,
                s["gamma_max"] if self.gamma_max is None else self.gamma_max)


# ----------------------------------------------------------------------------------------------
# losses and accuracy (per run)
# ----------------------------------------------------------------------------------------------
def single_loss_R(logits_RNC: Tensor, y_N: Tensor) -> Tensor:
    """Per-run mean cross-entropy of the single model's logits: ℓ_r = mean_n −log softmax(z_rn)_{y_n}."""
    logp = torch.log_softmax(logits_RNC, dim=-1)
    return -logp.gather(-1, y_N.expand(logits_RNC.shape[0], -1)[..., None]).squeeze(-1).mean(-1)


def moe_loss_R(out_RNC: Tensor, y_N: Tensor) -> Tensor:
    """The official MoE loss: ``CrossEntropyLoss(softmax(F(x)), y)``, i.e. ℓ = −log softmax(softmax(F))_y.

    (The MoE's forward ends in a softmax and ``nn.CrossEntropyLoss`` softmaxes again.) Its minimum is
    log(1 + 1/e) ≈ 0.3133 at a confident correct prediction — hence :data:`MOE_LOSS_FLOOR`.
    """
    return single_loss_R(torch.softmax(out_RNC, dim=-1), y_N)


def accuracy_R(logits_RNC: Tensor, y_N: Tensor) -> Tensor:
    """Per-run accuracy in % (argmax over classes; softmax does not change it)."""
    return (logits_RNC.argmax(-1) == y_N).float().mean(-1) * 100.0


# ----------------------------------------------------------------------------------------------
# training (the official recipes on the shared loop)
# ----------------------------------------------------------------------------------------------
def train_moe(model: ChenMoE, data: ChenData, *, steps: int = MOE_STEPS, expert_lr: float = 1e-3,
              router_lr: float = 0.1, generators: Sequence[torch.Generator] | None = None,
              early_stop: bool = True, track=None, description: str = "MoE") -> TrainLog:
    """Official MoE training: full batch, experts by normalised GD (lr 1e-3, per run and expert), router by
    SGD (lr 0.1), fresh routing noise every step from ``generators[r]``, loss :func:`moe_loss_R`, stopping
    rule :class:`~moekit.repro.experiments.train.EarlyStop` (tol 0.02, floor 0.314) per run."""
    num_runs = model.runs
    stopper = EarlyStop(num_runs, tol=0.02, floor=MOE_LOSS_FLOOR) if early_stop else None
    optimisers = [RunNormalizedGD(model.expert_parameters(), expert_lr), RunSGD(model.router_parameters(), router_lr)]
    return fit(lambda idx: moe_loss_R(model(data.x_NPD, generators=generators).y, data.y_N), optimisers,
               epochs=steps, early_stop=stopper, track=track, description=description)


def train_single(model: ChenSingle, data: ChenData, *, steps: int = SINGLE_STEPS, lr: float | None = None,
                 weight_decay: float = 5e-4, early_stop: bool = True, track=None,
                 description: str = "single") -> TrainLog:
    """Official single-model training: full batch, Adam (lr 0.003 linear / 0.01 cubic unless given, L2 weight
    decay 5e-4), cross-entropy on the logits, stop after step 500 once the loss rises 0.02 above its best."""
    if lr is None:
        lr = 0.01 if model.activation == "cubic" else 0.003
    stopper = EarlyStop(model.runs, tol=0.02, after=500) if early_stop else None
    opt = RunAdam(model.parameters(), lr=lr, weight_decay=weight_decay)
    return fit(lambda idx: single_loss_R(model(data.x_NPD), data.y_N), [opt], epochs=steps, early_stop=stopper,
               track=track, description=description)


def _gens(seeds: range, stream: int) -> list[torch.Generator]:
    """One generator per run; ``stream`` separates initialisation / training noise / evaluation noise."""
    return [seed_generator(s, stream) for s in seeds]


# ----------------------------------------------------------------------------------------------
# the experiment
# ----------------------------------------------------------------------------------------------
def run(ctx: RunContext) -> ExperimentResult:
    from moekit.analysis.plots import curves, routing_heatmap
    from moekit.analysis.routing import dispatch_entropy, routing_table
    from moekit.analysis.tables import routing_counts_markdown

    c: Config = ctx.config
    sigma_p, gamma_max = c.noise
    K, P, D, M = c.clusters, c.patches, c.dim, c.experts
    moe_steps, single_steps = (MOE_STEPS, SINGLE_STEPS) if c.steps is None else (c.steps, c.steps)
    num_runs = ctx.seeds
    seeds = range(num_runs)

    g_data = torch.Generator().manual_seed(c.data_seed)
    common = dict(num_clusters=K, num_patches=P, dim=D, sigma_p=sigma_p, gamma_max=gamma_max)
    train = make_chen_data(c.n_train, generator=g_data, **common)
    test = make_chen_data(c.n_test, generator=g_data, features=train.vectors, **common)

    rows: list[Row] = []
    logs: dict[str, TrainLog] = {}
    tables: dict[str, str] = {}
    notes: list[str] = []
    for stream, name in enumerate(MODELS, start=1):
        activation = name.split()[1]
        t0 = time.perf_counter()
        if name.startswith("single"):
            model = ChenSingle(num_runs, dim=D, filters_per_class=40, activation=activation, generators=_gens(seeds, stream))
            log = train_single(model, train, steps=single_steps, track=ctx.track, description=name)
            with torch.no_grad():
                train_acc, test_acc = accuracy_R(model(train.x_NPD), train.y_N), accuracy_R(model(test.x_NPD), test.y_N)
            metrics = {"test_acc": test_acc.tolist(), "train_acc": train_acc.tolist()}
        else:
            model = ChenMoE(num_runs, dim=D, num_experts=M, filters_per_class=8, activation=activation, gate=c.gate,
                            generators=_gens(seeds, stream))
            log = train_moe(model, train, steps=moe_steps, generators=_gens(seeds, 10 + stream),
                            track=ctx.track, description=name)
            # evaluation keeps the U[0,1) routing noise, as the official code does (it never leaves train mode)
            eval_gens = _gens(seeds, 20 + stream)
            with torch.no_grad():
                out_train, out_test = model(train.x_NPD, generators=eval_gens), model(test.x_NPD, generators=eval_gens)
            expert_ids = out_train.metrics["expert_ids"]
            entropy = [float(dispatch_entropy(expert_ids[r], train.cluster_N, M, K)) for r in seeds]
            metrics = {"test_acc": accuracy_R(out_test.y, test.y_N).tolist(),
                       "train_acc": accuracy_R(out_train.y, train.y_N).tolist(), "entropy": entropy}
            # per seed: where it ended, so a weak mean can be traced to the seeds that kept a cluster split
            notes.append(f"{name} per seed (test acc %, dispatch entropy, steps): " + "; ".join(
                f"seed {r}: {metrics['test_acc'][r]:.2f}, {entropy[r]:.3f}, {int(log.steps[r])}" for r in seeds))
            routing_counts = routing_table(expert_ids[0], train.cluster_N, M, K)
            clusters = [f"cluster {k}" for k in range(K)]
            tables[f"{name}: training examples per expert (rows) and cluster (columns), seed 0"] = \
                routing_counts_markdown(torch.as_tensor(routing_counts).tolist(), clusters)
            fig = routing_heatmap(torch.as_tensor(routing_counts).float(), [f"expert {m}" for m in range(M)], clusters,
                                  f"{name}: share of each cluster per expert (seed 0)", normalize="col")
            ctx.savefig(fig, f"routing_{activation}_moe.png")
        metrics["steps"] = [float(v) for v in log.steps.tolist()]
        logs[name] = log
        rows.append(Row(name, metrics))
        notes.append(f"{name}: {time.perf_counter() - t0:.1f} s wall; optimiser steps per seed "
                     f"{log.steps.tolist()} (early stop at steps {[s for s in log.stopped_at.tolist() if s >= 0]})")

    for group, title, ylabel in (
            (("single linear", "single cubic"), "Single models: training loss", "cross-entropy of logits"),
            (("MoE linear", "MoE cubic"), "MoEs: training loss", "cross-entropy of softmax output (floor 0.313)")):
        single = group[0].startswith("single")
        fig = curves({nm: logs[nm].losses.numpy() for nm in group}, title + " (x: a run's early stop)", "step",
                     ylabel, logy=single, stops={nm: logs[nm].stopped_at.tolist() for nm in group})
        ctx.savefig(fig, "loss_single.png" if single else "loss_moe.png")

    paper_setting = next((s for s, v in SETTINGS.items()
                          if v["sigma_p"] == sigma_p and v["gamma_max"] == gamma_max), None)
    paper: list[Row] = []
    if paper_setting is not None and (K, P, D, M) == (4, 4, 50, 8):
        paper = [Row(nm, dict(m), dict(s), source=SOURCE) for nm, (m, s) in PAPER[paper_setting].items()]
    else:
        notes.append("No published numbers for this configuration (the paper uses K=4, P=4, d=50, M=8 and "
                     "sigma_p/gamma_max of setting 1 or 2); the verdicts compare against setting "
                     f"{c.setting}'s numbers.")
    notes += [
        f"Paper rows: {SOURCE} (docs/papers.md).",
        "Gate: the chosen expert's output is multiplied by its noisy router logit h_m(x)+r_m (official code: "
        "top1 of the noisy logits, no softmax); --gate softmax uses softmax(h+r)_m, the paper's pi_m.",
        "MoE loss: CrossEntropyLoss applied to softmax(F(x)) (official code: softmax in the forward, then "
        "nn.CrossEntropyLoss), minimum log(1+1/e)=0.313. Routing noise U[0,1) is also used at evaluation.",
        "Early stopping per seed (official rule, as in the authors' synthetic_demo_s1.ipynb training loops, checked "
        "before each update): stop when the loss is not a new best and either rose more than 0.02 above the best "
        "or is <= 0.314 (MoE); singles: rose more than 0.02 above the best after step 500. A MoE seed that stops "
        "early has reached the loss floor or spiked; one that runs all steps has not reached the floor. The loss plots mark each run's stop with an x; after it the curve is the mean of the runs still "
        "training.",
        f"All seeds share one data draw (data seed {c.data_seed}), as the paper's 10 runs share one data set; "
        "seeds differ in initialisation and routing noise. Entropy is measured on the training set; experts "
        "are numbered from 0.",
    ]
    config = config_dict(c) | dict(sigma_p=sigma_p, gamma_max=gamma_max, seeds=num_runs, filters_per_class_moe=8,
                                   filters_per_class_single=40, moe_steps=moe_steps, single_steps=single_steps,
                                   expert_lr=1e-3, router_lr=0.1, single_lr={"linear": 0.003, "cubic": 0.01},
                                   weight_decay=5e-4, expert_init_scale=1e-3, scale=10.0, quick=bool(ctx.quick),
                                   threads=torch.get_num_threads())
    verdicts = _verdicts({r.name: r.metrics for r in rows}, PAPER[paper_setting or c.setting])
    return ExperimentResult(rows=rows, paper=paper, config=config, tables=tables, notes=notes, verdicts=verdicts)


def _verdicts(ours: dict[str, dict], paper: dict[str, tuple[dict, dict]]) -> list[Verdict]:
    """The paper's claims, graded from per-seed numbers (the models of one seed share its data and index)."""
    def v(name: str, metric: str = "test_acc") -> list[float]:
        return [float(x) for x in ours[name][metric]]

    def p(name: str, metric: str = "test_acc") -> float:
        return paper[name][0][metric]

    def near(name: str, tol: float) -> Check:
        return Check(f"|{name} − paper {p(name):.2f}|", [abs(x - p(name)) for x in v(name)], reproduced=tol,
                     partly=2 * tol, higher=False, unit="points")

    claims = Claims()
    claims.grade(f"A cubic (nonlinear) MoE nearly solves the task ({p('MoE cubic'):.2f} %)",
                 Check("MoE cubic test acc", v("MoE cubic"), reproduced=p("MoE cubic") - 1.5, partly=95.0, unit="%"))
    best_single = [max(a, b) for a, b in zip(v("single linear"), v("single cubic"))]
    worst_moe = [min(a, b) for a, b in zip(v("MoE linear"), v("MoE cubic"))]
    claims.grade(f"Single models fail ({p('single linear'):.1f} % linear, {p('single cubic'):.1f} % cubic), "
                 "below both MoEs",
                 [Check("worse MoE − better single (paired)", paired(worst_moe, best_single), reproduced=0.0,
                        partly=0.0, unit="points"), near("single linear", 3), near("single cubic", 3)])
    claims.grade(f"A linear MoE lies in between ({p('MoE linear'):.2f} ± {paper['MoE linear'][1]['test_acc']:.2f} %)",
                 [near("MoE linear", 3),
                  Check("MoE linear − single cubic (paired)", paired(v("MoE linear"), v("single cubic")),
                        reproduced=0.0, partly=0.0, unit="points"),
                  Check("MoE cubic − MoE linear (paired)", paired(v("MoE cubic"), v("MoE linear")),
                        reproduced=0.0, partly=0.0, unit="points")])
    claims.grade(f"The cubic MoE's router sends each cluster to one expert (dispatch entropy "
                 f"{p('MoE cubic', 'entropy'):.3f}), the linear MoE's does not ({p('MoE linear', 'entropy'):.3f})",
                 [Check("MoE cubic dispatch entropy", v("MoE cubic", "entropy"), reproduced=0.3, partly=0.6,
                        higher=False, unit="nats"),
                  Check("MoE linear − MoE cubic entropy (paired)",
                        paired(v("MoE linear", "entropy"), v("MoE cubic", "entropy")), reproduced=0.5, partly=0.0,
                        unit="nats")],
                 note=f"ln K = {math.log(4):.3f} is cluster-blind")
    return claims.verdicts


EXPERIMENT = Experiment(
    name="chen2022",
    paper="Chen, Deng, Wu, Gu & Li 2022, Towards Understanding Mixture of Experts in Deep Learning",
    summary="Synthetic cluster task: a cubic top-1 MoE routes each cluster to one expert and beats linear "
            "MoEs and single models",
    est_time="~10 min",
    run=run,
    config=Config,
    quick_time="<30 s",
    default_seeds=10,   # the authors' notebooks average 10 runs; 9.3 min of one core here
    quick_seeds=2,
)
