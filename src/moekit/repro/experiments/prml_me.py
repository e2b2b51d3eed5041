"""`moekit run prml-me`: mixtures of experts on a multimodal regression (PRML §14.5; Jordan & Jacobs 1994).

Legend: T examples, E components / experts (the paper's K in its formulas); seeds, EM iterations and the plot
grids over the input and the target are counted in words (see the package legend). The public arguments of
:func:`log_density` and :func:`conditional_mean` keep their historical names: ``x_N`` and ``t_N`` are (T,).

Data (:func:`moekit.repro.datasets.synthetic.inverse_sinusoid`): PRML §5.6's inverse problem — t ~ U(0, 1),
x = t + 0.3 sin(2πt) + U(−0.1, 0.1), and the models predict t from x. Around x ≈ 0.4–0.6 several t are valid,
so the conditional density p(t | x) is multimodal and its mean lies between the branches.

Models, each scored by the test negative log-likelihood −(1/N) Σ log p(t_n | x_n) (nats per example):

* **single net** — a tanh MLP trained on squared error (the conditional mean), turned into a density with
  one Gaussian of the training residuals' variance (maximum likelihood);
* **mixture of linear regressions (EM)** — :class:`moekit.repro.models.mixture_regression.MixtureOfLinearRegressions`,
  PRML §14.5.1: K lines in x with input-independent mixing coefficients and a shared variance, fitted by
  EM from several random starts (every EM log-likelihood trace is checked to be non-decreasing);
* **ME** — :class:`moekit.layers.classic.MixtureOfLocalExperts` (PRML §14.5.3): K linear Gaussian experts
  with learned variances and a linear softmax gate, trained by gradient descent on the mixture NLL;
* **ME, MLP gate** — the same with a one-hidden-layer tanh gate (the gate of a mixture density network);
* **HME** — :class:`moekit.layers.classic.HierarchicalMixtureOfExperts` (Jordan & Jacobs 1994): two levels of
  linear softmax gates over linear Gaussian experts.

The exact conditional density of the generating process (:func:`inverse_sinusoid_log_density`) gives the
best NLL any model can reach on this data (the **true density** row).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from moekit.analysis.tables import markdown_table
from moekit.repro.datasets.synthetic import inverse_sinusoid, inverse_sinusoid_log_density
from moekit.layers.classic import HierarchicalMixtureOfExperts, MixtureOfLocalExperts
from moekit.repro.models.baselines import SingleNet
from moekit.repro.models.mixture_regression import MixtureOfLinearRegressions
from .base import Experiment, ExperimentResult, Row, RunContext, Source, mean_std
from .verdicts import Check, Claims, paired
from .options import config_dict, option
from .train import fit, seed_generator, seeded_global

DATA_SRC = Source("Bishop, PRML", "§5.6, Figs. 5.19–5.21 (the inverse problem)", "recalled")
ME_SRC = Source("Bishop, PRML", "§14.5.1–14.5.3, Figs. 14.8–14.10", "recalled")
NETS = ("single net", "ME", "ME, MLP gate", "HME")
MODELS = ("single net", "mixture of linear regressions (EM)", "ME", "ME, MLP gate", "HME")
ORACLE = "true density"
_DATA, _INIT, _EM, _TEST = 0, 1, 2, 3        # seed_generator streams


@dataclass(frozen=True)
class Config:
    n_train: int = option(1000, "training examples", ge=10, quick=300)
    n_test: int = option(2000, "test examples", ge=10, quick=500)
    amplitude: float = option(0.3, "x = t + amplitude·sin(2πt) + noise", ge=0)
    noise: float = option(0.1, "half-width of the uniform noise on x", gt=0)
    components: int = option(3, "K: components of the EM mixture and experts of the flat ME", ge=1)
    groups: int = option(2, "HME: gates at the top level", ge=1)
    experts_per_group: int = option(2, "HME: experts under each top-level branch", ge=1)
    hidden: int = option(20, "tanh hidden units of the single net and of the MLP gate", ge=1)
    steps: int = option(1000, "full-batch Adam steps of the gradient-trained models", ge=1, quick=300)
    lr: float = option(0.05, "Adam learning rate", gt=0)
    restarts: int = option(4, "random initialisations of each gradient-trained model (the lowest training "
                              "loss is kept)", ge=1, quick=2)
    init_std: float = option(0.1, "initial σ of the learned expert variances", gt=0)
    em_restarts: int = option(5, "random starts of EM (the best log-likelihood is kept)", ge=1, quick=3)
    em_iters: int = option(500, "EM iterations at most (stops when a step gains < 1e-9 nats per example)", ge=1)


# --------------------------------------------------------------------------------------------------
# Models and their conditional densities
# --------------------------------------------------------------------------------------------------

def _build(name: str, c: Config) -> nn.Module:
    if name == "single net":
        return SingleNet(c.hidden)
    if name == "ME":
        return MixtureOfLocalExperts(1, 1, c.components, expert="linear", gate="linear", learn_variance=True)
    if name == "ME, MLP gate":
        return MixtureOfLocalExperts(1, 1, c.components, expert="linear", gate="mlp", gate_hidden=c.hidden,
                                     learn_variance=True)
    if name == "HME":
        return HierarchicalMixtureOfExperts(1, 1, c.groups, c.experts_per_group, expert="linear", gate="linear",
                                            learn_variance=True)
    raise ValueError(f"model: unknown {name!r}")


def _loss(model: nn.Module, x_T1: Tensor, t_T1: Tensor) -> Tensor:
    if isinstance(model, SingleNet):
        return (model(x_T1) - t_T1).pow(2).mean()
    return model.loss(model(x_T1), t_T1)


def _components(model, x_T: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(log mixing weights (T, E), means (T, E), variances (T, E)) of any model's p(t | x)."""
    if isinstance(model, MixtureOfLinearRegressions):
        phi = _phi(x_T)
        T = x_T.shape[0]
        return (model.log_mix_K.expand(T, -1), model.component_means(phi),
                model.var_K.expand(T, -1))
    x_T1 = x_T.float()[:, None]
    with torch.no_grad():
        if isinstance(model, SingleNet):
            mean = model(x_T1).double()
            return torch.zeros_like(mean), mean, model.log_var.double().exp().expand_as(mean)
        out = model(x_T1)
        var = out.log_var.double().exp()[:, 0].expand(x_T.shape[0], -1)
        return out.log_gates.double(), out.expert_outputs[..., 0].double(), var


def log_density(model, x_N: Tensor, t_N: Tensor) -> Tensor:
    """(T,) log p(t_n | x_n) under the model's Gaussian mixture."""
    log_w, mean, var = _components(model, x_N)
    log_n = -0.5 * ((t_N.double()[:, None] - mean).pow(2) / var + var.log() + math.log(2 * math.pi))
    return torch.logsumexp(log_w + log_n, -1)


def conditional_mean(model, x_N: Tensor) -> Tensor:
    log_w, mean, _ = _components(model, x_N)
    return (log_w.exp() * mean).sum(-1)


def _phi(x_T: Tensor) -> Tensor:
    x = x_T.double()
    return torch.stack([torch.ones_like(x), x], -1)


def _modes(density: Tensor, t_grid: Tensor, floor: float = 0.1) -> list[tuple[int, float]]:
    """(grid index, t) of the local maxima of each row of a density grid above ``floor``·row max."""
    d = density
    peak = (d[:, 1:-1] > d[:, :-2]) & (d[:, 1:-1] >= d[:, 2:]) & (d[:, 1:-1] > floor * d.max(1, keepdim=True).values)
    gi, ti = peak.nonzero(as_tuple=True)
    return [(int(g), float(t_grid[int(j) + 1])) for g, j in zip(gi, ti)]


# --------------------------------------------------------------------------------------------------
# The experiment
# --------------------------------------------------------------------------------------------------

def run(ctx: RunContext) -> ExperimentResult:
    c: Config = ctx.config
    seeds = list(range(ctx.seeds))
    nll: dict[str, list[float]] = {m: [] for m in (*MODELS, ORACLE)}
    mse: dict[str, list[float]] = {m: [] for m in MODELS}
    em_rows, em_traces = [], []
    em_decreases, em_min_step = 0, math.inf
    first: dict[str, object] = {}
    gate_by_seed: list[Tensor] = []     # ME (linear gate): gate values at x = 0, 1, 0.5 per seed
    first_data: tuple[Tensor, Tensor] | None = None
    for s in ctx.track(seeds, len(seeds), "prml-me: seeds"):
        x_tr, t_tr = inverse_sinusoid(c.n_train, seed_generator(s, _DATA), amplitude=c.amplitude, noise=c.noise)
        x_te, t_te = inverse_sinusoid(c.n_test, seed_generator(s, _TEST), amplitude=c.amplitude, noise=c.noise)
        if first_data is None:
            first_data = (x_tr, t_tr)
        nll[ORACLE].append(float(-inverse_sinusoid_log_density(x_te, t_te, amplitude=c.amplitude,
                                                               noise=c.noise).mean()))
        models: dict[str, object] = {}
        # ---- gradient-trained models ----
        x1, t1 = x_tr[:, None], t_tr[:, None]
        for j, name in enumerate(NETS):
            best_loss, best_model = math.inf, None
            for k in range(c.restarts):
                with seeded_global(s, _INIT + 10 * j + 100 * k):
                    model = _build(name, c)
                if getattr(model, "log_var_EO", None) is not None:
                    with torch.no_grad():
                        model.log_var_EO.fill_(2 * math.log(c.init_std))
                opt = torch.optim.Adam(model.parameters(), lr=c.lr)
                fit(lambda _idx, model=model: _loss(model, x1, t1), [opt], epochs=c.steps, model=model)
                model.eval()
                with torch.no_grad():
                    final = float(_loss(model, x1, t1))
                if final < best_loss:
                    best_loss, best_model = final, model
            model = best_model
            if isinstance(model, SingleNet):
                with torch.no_grad():     # maximum-likelihood variance of the Gaussian around the mean
                    model.log_var.copy_((model(x1) - t1).pow(2).mean().log())
            models[name] = model
        # ---- EM: every restart's trace is checked ----
        g = seed_generator(s, _EM)
        best = None

        for _ in range(c.em_restarts):
            m = MixtureOfLinearRegressions.fit(_phi(x_tr), t_tr, c.components, max_iter=c.em_iters, generator=g)
            tr = torch.tensor(m.log_likelihood_trace, dtype=torch.float64)
            if tr.numel() > 1:
                steps = tr[1:] - tr[:-1]
                em_min_step = min(em_min_step, float(steps.min()))
                em_decreases += int((steps < -1e-9 * tr.abs().max()).sum())
            if best is None or m.log_likelihood_trace[-1] > best.log_likelihood_trace[-1]:
                best = m
        em_traces.append(best.log_likelihood_trace)
        em_rows.append([str(s), str(len(best.log_likelihood_trace) - 1),
                        f"{best.log_likelihood_trace[0] / c.n_train:.3f}", f"{best.log_likelihood_trace[-1] / c.n_train:.3f}",
                        ", ".join(f"{float(v):.3f}" for v in best.log_mix_K.exp()), f"{float(best.var_K[0].sqrt()):.3f}"])
        models["mixture of linear regressions (EM)"] = best
        for name in MODELS:
            nll[name].append(float(-log_density(models[name], x_te, t_te).mean()))
            mse[name].append(float((conditional_mean(models[name], x_te) - t_te.double()).pow(2).mean()))
        if not first:
            first = dict(models)
        gate_by_seed.append(_components(models["ME"], torch.tensor([0.0, 1.0, 0.5]))[0].exp())

    rows = [Row(m, {"test_nll": nll[m], "test_mse_of_mean": mse[m]}) for m in MODELS]
    rows.append(Row(ORACLE, {"test_nll": nll[ORACLE]}))

    claims = Claims()
    claims.grade("A single least-squares network, which predicts the conditional mean, models the multimodal "
                 "inverse problem worse than mixtures of experts (test NLL)",
                 [Check(f"NLL(single) − NLL({m}) (paired)", paired(nll["single net"], nll[m]), reproduced=0.05,
                        partly=0.0, unit="nats") for m in ("ME", "ME, MLP gate", "HME")])
    # an invariant checked on every step of every EM run, not an estimate: counted exactly
    claims.grade("EM never decreases the log-likelihood (PRML §14.5.1)",
                 Check(f"decreasing steps over {len(seeds)}×{c.em_restarts} EM runs", [float(em_decreases)],
                       reproduced=0.0, partly=0.0, higher=False, exact=True),
                 note=f"smallest step {em_min_step:+.2e} nats")
    em = "mixture of linear regressions (EM)"
    claims.grade("Input-dependent gates (ME) beat the input-independent mixing coefficients of the mixture of "
                 "linear regressions (PRML §14.5.3)",
                 [Check(f"NLL(EM mixture) − NLL({m}) (paired)", paired(nll[em], nll[m]), reproduced=0.0,
                        partly=0.0, unit="nats") for m in ("ME", "ME, MLP gate")])
    # every seed's gate: the larger of the two end gates' maxima must be sharp, the ends on different
    # experts, and at least two experts must share the middle
    end_sharpness = [float(min(gv[0].max(), gv[1].max())) if gv[0].argmax() != gv[1].argmax() else 0.0
                     for gv in gate_by_seed]
    middle_shared = [float((gv[2] > 0.15).sum()) for gv in gate_by_seed]
    claims.grade("The gate divides the input: one expert at each end of the range, several share the "
                 "multi-valued middle (PRML Fig. 5.21's mixing coefficients)",
                 [Check("ME (linear gate): the weaker end's top gate at x=0 / x=1, 0 when both ends pick one expert",
                        end_sharpness, reproduced=0.8, partly=0.5),
                  Check("experts with gate > 0.15 at x=0.5", middle_shared, reproduced=2.0, partly=1.5)])
    verdicts = claims.verdicts

    tables = {
        "EM for the mixture of linear regressions (best of the restarts, per seed; log-likelihood per example)":
            markdown_table(["seed", "EM steps", "LL at start", "LL at end", "π_k", "σ"], em_rows),
        "Test NLL (nats per example), mean ± std over seeds": markdown_table(
            ["model", "test NLL", "test MSE of the conditional mean"],
            [[m, "{:.3f} ± {:.3f}".format(*mean_std(nll[m])),
              "{:.4f} ± {:.4f}".format(*mean_std(mse[m])) if m in mse else "–"] for m in (*MODELS, ORACLE)]),
    }
    _plots(ctx, c, first, first_data, em_traces[0])
    notes = [
        f"Data: {DATA_SRC} — x = t + 0.3 sin(2πt) + U(−0.1, 0.1) noise, t ~ U(0, 1), the roles of input and target "
        "exchanged; the exact p(t | x) of this process (flat over the valid t) gives the 'true density' row.",
        f"Models: {ME_SRC}; Jordan & Jacobs 1994 for the hierarchical mixture. Experts are linear in x with one "
        f"learned variance each; K = {c.components} for EM and the flat ME, {c.groups}×{c.experts_per_group} leaves "
        "for HME. PRML reports these as figures (no numbers): the verdicts test the behaviour it describes.",
        "The single net's density is one Gaussian around its prediction with the training residuals' variance "
        "(the maximum-likelihood choice). MSE of the conditional mean: every model's mean Σ_k π_k(x) μ_k(x) — the "
        "least-squares net is built to minimise it, so a low MSE does not mean a good density.",
        f"Training: full-batch Adam, lr {c.lr:g}, {c.steps} steps for the gradient-trained models, the best (lowest "
        f"training loss) of {c.restarts} initialisations, learned σ starting at {c.init_std:g}; EM from "
        f"{c.em_restarts} random starts (each component the line through a random pair of points), shared variance "
        "as in PRML §14.5.1.",
    ]
    config = config_dict(c) | {"seeds": seeds}
    return ExperimentResult(rows=rows, paper=[], config=config, tables=tables, notes=notes, verdicts=verdicts)


def _plots(ctx: RunContext, c: Config, models: dict, data: tuple[Tensor, Tensor], em_trace: list[float]) -> None:
    from moekit.analysis.plots import _plt
    plt = _plt()
    x_tr, t_tr = data
    x_grid = torch.linspace(float(x_tr.min()) - 0.05, float(x_tr.max()) + 0.05, 120, dtype=torch.float64)
    t_grid = torch.linspace(-0.15, 1.15, 196, dtype=torch.float64)
    panels: list[tuple[str, Callable[[Tensor, Tensor], Tensor], object]] = [
        (ORACLE, lambda x, t: inverse_sinusoid_log_density(x, t, amplitude=c.amplitude, noise=c.noise), None)]
    panels += [(m, lambda x, t, mm=models[m]: log_density(mm, x, t), models[m]) for m in MODELS]
    fig, axes = plt.subplots(2, 3, figsize=(12, 7), sharex=True, sharey=True)
    xg, tg = torch.meshgrid(x_grid, t_grid, indexing="ij")
    for ax, (name, logp, model) in zip(axes.flat, panels):
        density = logp(xg.reshape(-1), tg.reshape(-1)).exp().reshape(len(x_grid), len(t_grid))
        ax.imshow(density.T.clamp_max(float(density.quantile(0.99))).numpy(), origin="lower", aspect="auto",
                  extent=(float(x_grid[0]), float(x_grid[-1]), float(t_grid[0]), float(t_grid[-1])), cmap="Blues")
        ax.scatter(x_tr.numpy(), t_tr.numpy(), s=2, c="grey", alpha=0.4)
        modes = _modes(density, t_grid) if model is not None else []   # the true density is flat: no modes
        if modes:
            ax.scatter([float(x_grid[g]) for g, _ in modes], [t for _, t in modes], s=3, c="red", label="modes")
        if model is not None:
            ax.plot(x_grid.numpy(), conditional_mean(model, x_grid).numpy(), c="black", lw=1.5, label="mean")
        ax.set_xlim(float(x_grid[0]), float(x_grid[-1]))
        ax.set_ylim(float(t_grid[0]), float(t_grid[-1]))
        ax.set_title(name, fontsize=10)
        if model is not None:
            ax.legend(fontsize=7, loc="upper left")
    for ax in axes[-1]:
        ax.set_xlabel("input x")
    for ax in axes[:, 0]:
        ax.set_ylabel("target t")
    fig.suptitle("Inverse problem (seed 0): p(t | x) (shade), its modes (red), mean (black), training data (grey)")
    fig.tight_layout()
    ctx.savefig(fig, "densities.png")

    # gates over the input
    mix = ["mixture of linear regressions (EM)", "ME", "ME, MLP gate", "HME"]
    fig, axes = plt.subplots(1, len(mix), figsize=(4 * len(mix), 3.4), sharey=True)
    for ax, name in zip(axes, mix):
        model = models[name]
        if isinstance(model, MixtureOfLinearRegressions):
            gamma = model.responsibilities(_phi(x_tr), t_tr.double())
            for k in range(gamma.shape[1]):
                ax.scatter(x_tr.numpy(), gamma[:, k].numpy(), s=3, alpha=0.5, label=f"posterior γ, comp. {k}")
                ax.axhline(float(model.log_mix_K[k].exp()), ls="--", c=f"C{k}", lw=1)
            ax.set_title(f"{name}\n(π_k constant: dashed; dots: posterior)", fontsize=9)
        else:
            w = _components(model, x_grid)[0].exp()
            for k in range(w.shape[1]):
                ax.plot(x_grid.numpy(), w[:, k].numpy(), c=f"C{k}", label=f"expert {k}")
            if name == "HME":
                with torch.no_grad():
                    top = model(x_grid.float()[:, None]).group_gates
                for gi in range(top.shape[1]):
                    ax.plot(x_grid.numpy(), top[:, gi].numpy(), ls=":", c="black", lw=1,
                            label="top gate g_i" if gi == 0 else None)
            ax.set_title(f"{name}: gate π_k(x)", fontsize=9)
        ax.set_xlabel("input x")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("gate / responsibility")
    fig.tight_layout()
    ctx.savefig(fig, "gates.png")

    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.plot(range(len(em_trace)), [v / c.n_train for v in em_trace], marker=".")
    ax.set_xlabel("EM step")
    ax.set_ylabel("log-likelihood per example")
    ax.set_title("EM, mixture of linear regressions (seed 0, best start)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    ctx.savefig(fig, "em_log_likelihood.png")


EXPERIMENT = Experiment(
    name="prml-me",
    paper="Bishop 2006, PRML §14.5.1–14.5.3 (mixtures of linear regressions and of experts); Jordan & Jacobs 1994 (HME)",
    summary="multimodal inverse problem: single net vs EM mixture of linear regressions vs ME vs hierarchical ME (test NLL)",
    est_time="~2 min",
    quick_time="<20 s",
    run=run,
    config=Config,
    default_seeds=4,
    quick_seeds=2,
)
