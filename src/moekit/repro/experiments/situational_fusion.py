"""Situational fusion of representation experts for navigation (Shen et al., ICCV 2019), on procedural maps.

Legend: B states / episodes in a batch, Y = 9 actions (the action classes); views (representation experts),
target categories and seeds are counted in words (see the package legend). The public arguments of
:func:`imitation_loss` keep their historical names (``probs_BA`` and ``optimal_BA`` are (B, Y)), and so do
the :class:`~moekit.repro.envs.gridnav.NavWorld` attributes read here (see that module).

Gibson is replaced by :mod:`moekit.repro.envs.gridnav`: indoor maps on an 8-neighbour grid (rooms joined by
one-cell corridors, furniture of 4 categories); an episode is a random start 6–32 steps from the target
category; actions are the 8 moves and stop; success = within 3 steps of the goal within 39 steps; policies
are trained by imitation of the shortest path (every floor state of the training maps, the loss is
``−log Σ_{a optimal} π(a|o)``) and tested on **unseen** maps. The agent's views stand in for the paper's
frozen Taskonomy representations: ``depth`` and ``layout`` (3D, mutually redundant), ``semantic`` (target
presence by direction), ``texture`` (appearance and edges; per-map wall colours are a nuisance to overfit
to), ``vanishing`` (low-level: noisy axis of the longest free line of sight). Every policy head (and the
fusion net) also gets the goal: the target category (one-hot) and a noisy compass to the nearest target
furniture (see :mod:`moekit.repro.envs.gridnav` for why a memoryless agent needs one).

Models, each trained with Adam on the same states: one policy per view (``single: <view>``); ``concat``
(one MLP over all views); ``feature fusion`` and ``action fusion`` (:class:`moekit.layers.fusion.
SituationalFusion` at the feature and the action level); ``action fusion + affinity`` (the same plus
``β · w̄ᵀ A w̄`` on the batch-mean fusion weights, ``A`` the data-driven affinity of the views: the overlap
``Σ_a min(π_i, π_j)`` of the single-view policies on training states, the analogue of the paper's Taskonomy
task affinities); and a random walk. Each seed draws new training and test maps and new initialisations.

Everything runs once per training regime (``--train-maps 4 24``: few maps, where memorising the training maps
is easy, and many): the rows are named ``model [N maps]`` and every table, plot and verdict is per regime.

Analyses: fusion weights by situation on the unseen maps (corridor vs room, clearance = distance to the
nearest obstacle), and robustness — each view dropped (zeroed) or noised at test time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch
from torch import Tensor, nn

from moekit.analysis.tables import markdown_table
from moekit.repro.envs.gridnav import (CATEGORIES, VIEW_FAMILY, VIEWS, NavWorld, in_sight_oracle, make_world,
                            random_walk_policy)
from moekit.repro.models.navigation import FrozenExpertFusion, FusionPolicy, GatedFeatureFusion, MLPPolicy
from .base import Experiment, ExperimentResult, Row, RunContext, Verdict, mean_std
from .verdicts import Check, Claims, paired
from .options import config_dict, option
from .train import cosine, fit, seed_generator, seeded_global

PAPER = "Shen, Xu, Zhu, Guibas, Fei-Fei & Savarese 2019, Situational fusion of visual representation for visual navigation (ICCV)"
FUSED = ("concat", "feature fusion", "action fusion", "action fusion + affinity")
# the paper's form: independently trained single-view policies, frozen, mixed by a gate that reads the intact
# observation (the paper's RGB image), and a feature-level model with the same gate
FROZEN, GATED_FEATURE = "action fusion, frozen experts", "feature fusion, same gate"
GATED = (FROZEN, GATED_FEATURE)
FAMILIES = ("3D", "semantic", "2D", "low-level")


@dataclass(frozen=True)
class Config:
    train_maps: tuple[int, ...] = option((4, 24), "numbers of training maps, one regime each (few maps: overfitting "
                                         "dominates)", ge=1, nonempty=True, quick=(8,))
    test_maps: int = option(12, "unseen maps to test on", ge=1, quick=4)
    map_size: int = option(28, "grid side in cells", ge=16)
    steps: int = option(3000, "Adam steps per model", ge=1, quick=250)
    batch_size: int = option(256, "states per step (the paper's batch size)", ge=1)
    lr: float = option(3e-3, "Adam learning rate (cosine schedule)", gt=0)
    hidden: int = option(64, "hidden units of each policy head and of the fusion net (concat: hidden x views)", ge=1)
    beta: float = option(1.0, "weight of the inter-task affinity penalty", ge=0)
    penalty_form: Literal["quadratic", "pairwise", "mean"] = option(
        "quadratic", "affinity penalty on the batch-mean fusion weights (moekit.layers.fusion.affinity_penalty)")
    episodes: int = option(1024, "test episodes per seed and model (the paper's 1024)", ge=1, quick=256)
    max_steps: int = option(39, "steps per episode (the paper's 39)", ge=1)
    success_radius: int = option(3, "success: within this many steps of the goal (the paper's 3)", ge=0)


# --------------------------------------------------------------------------------------------------
# Policies (moekit.repro.models.navigation): views + target -> action probabilities, aux loss, fusion weights
# --------------------------------------------------------------------------------------------------

def _inputs(world: NavWorld, m: Tensor, c: Tensor, p: Tensor, gen: torch.Generator) -> tuple[list[Tensor], Tensor]:
    """The views and the goal of a batch of states (one noise draw)."""
    return world.observe(m, c, p, gen), world.goal(m, c, p, gen)


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def imitation_loss(probs_BA: Tensor, optimal_BA: Tensor) -> Tensor:
    """``mean_B −log Σ_{a optimal} π(a)``: the probability of taking one of the shortest-path actions."""
    return -(probs_BA * optimal_BA).sum(-1).clamp_min(1e-8).log().mean()


def _train(ctx: RunContext, name: str, model: nn.Module, world: NavWorld, states: tuple[Tensor, Tensor, Tensor],
           cfg: Config, seed: int) -> list[float]:
    """``cfg.steps`` Adam steps on batches of training states drawn with replacement; the loss curve."""
    noise = seed_generator(seed, stream=3)
    m_all, c_all, p_all = states

    def loss_fn(idx: Tensor | None) -> Tensor:
        if idx is None:  # a batch as large as the data: all states
            idx = torch.arange(m_all.numel())
        m, c, p = m_all[idx], c_all[idx], p_all[idx]
        probs, aux, _ = model(*_inputs(world, m, c, p, noise))
        return imitation_loss(probs, world.optimal_MCPA[m, c, p].float()) + aux

    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    log = fit(loss_fn, [opt], epochs=cfg.steps, n=m_all.numel(), batch_size=cfg.batch_size, sample="replacement",
              generator=seed_generator(seed, stream=2), schedule=cosine, model=model, track=ctx.track,
              description=f"seed {seed}: {name}")
    curve = torch.as_tensor(log.losses).reshape(-1)
    return curve.reshape(-1, 50).mean(-1).tolist() if curve.numel() % 50 == 0 else curve.tolist()


def _policy_fn(model: nn.Module) -> Callable[[list[Tensor], Tensor, tuple], Tensor]:
    def f(views: list[Tensor], goal_B: Tensor, state: tuple) -> Tensor:
        with torch.no_grad():
            return model(views, goal_B)[0]
    return f


def _gated_policy_fn(model: nn.Module) -> Callable[[list[Tensor], Tensor, tuple], Tensor]:
    """For a transform that appends the intact views: the experts read the first half, the gate the second."""
    def f(views: list[Tensor], goal_B: Tensor, state: tuple) -> Tensor:
        n = len(views) // 2
        with torch.no_grad():
            return model(views[:n], goal_B, gate_views=views[n:])[0]
    return f


def _success(world: NavWorld, policy: Callable, episodes: tuple[Tensor, Tensor, Tensor], seed: int, cfg: Config,
             transform: Callable | None = None) -> float:
    m, c, p = episodes
    out = world.rollout(policy, m, c, p, seed_generator(seed, stream=4), max_steps=cfg.max_steps,
                        success_radius=cfg.success_radius, transform=transform)
    return 100.0 * float(out["success_B"].float().mean())


def _affinity(models: list[nn.Module], world: NavWorld, states: tuple[Tensor, Tensor, Tensor], seed: int) -> Tensor:
    """``A_ij = mean over training states of Σ_a min(π_i(a), π_j(a))`` (1 on the diagonal)."""
    gen = seed_generator(seed, stream=5)
    idx = torch.randint(states[0].numel(), (4096,), generator=gen)
    m, c, p = (s[idx] for s in states)
    views, goal = _inputs(world, m, c, p, gen)
    with torch.no_grad():
        probs = torch.stack([mod(views, goal)[0] for mod in models])  # (views, B, Y)
    return torch.minimum(probs[:, None], probs[None, :]).sum(-1).mean(-1)


# --------------------------------------------------------------------------------------------------
# Situational analysis: fusion weights by corridor / room and by clearance
# --------------------------------------------------------------------------------------------------

SITUATIONS = ("corridor", "room", "clearance 1", "clearance 2", "clearance ≥3",
              "room, target visible", "room, target not visible")


def _weights_by_situation(model: FusionPolicy, world: NavWorld, seed: int) -> dict[str, Tensor]:
    """Mean fusion weights (views,) over the test states of each situation."""
    m, c, p = world.states(max_dist=32)
    gen = seed_generator(seed, stream=6)
    with torch.no_grad():
        w = model(*_inputs(world, m, c, p, gen))[2]
    corridor = world.corridor_MP[m, p]
    clear = world.clearance_MP[m, p]
    visible = world.target_in_sight(m, c, p)
    masks = {"corridor": corridor, "room": ~corridor, "clearance 1": clear == 1, "clearance 2": clear == 2,
             "clearance ≥3": clear >= 3, "room, target visible": ~corridor & visible,
             "room, target not visible": ~corridor & ~visible}
    return {k: (w[v].mean(0) if v.any() else torch.full((len(VIEWS),), math.nan)) for k, v in masks.items()}


def _family(w_view: Tensor) -> dict[str, float]:
    return {f: float(sum(w_view[i] for i, v in enumerate(VIEWS) if VIEW_FAMILY[v] == f)) for f in FAMILIES}


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------

def _run_seed(ctx: RunContext, cfg: Config, seed: int, n_train: int) -> dict:
    train = make_world(n_train, seed=2 * seed, size=cfg.map_size)  # fewer maps: the first n of the same sequence
    test = make_world(cfg.test_maps, seed=2 * seed + 1_000_001, size=cfg.map_size)
    states = train.states()
    gen_ep = seed_generator(seed, stream=1)
    ep_test = test.sample_episodes(cfg.episodes, gen_ep)
    ep_train = train.sample_episodes(cfg.episodes, gen_ep)
    dims = train.view_dims
    res: dict = {"success": {}, "seen": {}, "params": {}, "curves": {}}

    singles = []
    for i, v in enumerate(VIEWS):
        with seeded_global(seed, stream=10 + i):
            mod = MLPPolicy(dims, [i], cfg.hidden)
        res["curves"][f"single: {v}"] = _train(ctx, f"{n_train} maps, single {v}", mod, train, states, cfg, seed)
        singles.append(mod)
    affinity = _affinity(singles, train, states, seed)
    res["affinity"] = affinity
    with seeded_global(seed, stream=20):
        concat = MLPPolicy(dims, list(range(len(VIEWS))), cfg.hidden * len(VIEWS))
    with seeded_global(seed, stream=21):
        feat = FusionPolicy(dims, cfg.hidden, "feature")
    with seeded_global(seed, stream=22):
        act = FusionPolicy(dims, cfg.hidden, "action")
    with seeded_global(seed, stream=22):  # the same initialisation as plain action fusion: only the penalty differs
        act_aff = FusionPolicy(dims, cfg.hidden, "action", affinity=affinity, beta=cfg.beta, penalty_form=cfg.penalty_form)
    fused = dict(zip(FUSED, (concat, feat, act, act_aff)))
    with seeded_global(seed, stream=23):
        frozen = FrozenExpertFusion(singles, dims, cfg.hidden)     # the singles above, trained on their own
    with seeded_global(seed, stream=24):
        gated_feat = GatedFeatureFusion(dims, cfg.hidden)
    gated = dict(zip(GATED, (frozen, gated_feat)))
    for name, mod in {**fused, **gated}.items():
        res["curves"][name] = _train(ctx, f"{n_train} maps, {name}", mod, train, states, cfg, seed)
    models = {**{f"single: {v}": s for v, s in zip(VIEWS, singles)}, **fused, **gated}
    for name, mod in models.items():
        res["success"][name] = _success(test, _policy_fn(mod), ep_test, seed, cfg)
        res["seen"][name] = _success(train, _policy_fn(mod), ep_train, seed, cfg)
        res["params"][name] = sum(p.numel() for p in mod.parameters() if p.requires_grad) if name == FROZEN \
            else _n_params(mod)
    res["success"]["random walk"] = _success(test, random_walk_policy, ep_test, seed, cfg)
    res["seen"]["random walk"] = _success(train, random_walk_policy, ep_train, seed, cfg)
    res["params"]["random walk"] = 0
    res["success"]["in-sight oracle"] = _success(test, in_sight_oracle(test), ep_test, seed, cfg)
    res["seen"]["in-sight oracle"] = _success(train, in_sight_oracle(train), ep_train, seed, cfg)
    res["params"]["in-sight oracle"] = 0
    # situations
    res["situations"] = {name: _weights_by_situation(fused[name], test, seed)
                         for name in ("action fusion", "action fusion + affinity")}
    res["mean_weights"] = {}
    m, c, p = test.states(max_dist=32)
    for name in ("feature fusion", "action fusion", "action fusion + affinity"):
        with torch.no_grad():
            res["mean_weights"][name] = fused[name](*_inputs(test, m, c, p, seed_generator(seed, stream=6)))[2].mean(0)
    # robustness: one view dropped (zeros) or noised (Gaussian, std = that view's std on training states)
    m, c, p = states
    ref = train.observe(m, c, p, seed_generator(seed, stream=7))
    view_std = [float(v.std()) for v in ref]
    rob: dict[str, dict[str, list[float]]] = {"drop": {}, "noise": {}}
    all_fused = {**fused, **gated}
    for name in (*FUSED, *GATED):
        for kind in ("drop", "noise"):
            vals = []
            for i in range(len(VIEWS)):
                def tf(views: list[Tensor], i=i, kind=kind, g=seed_generator(seed, stream=8),
                       keep=name in GATED) -> list[Tensor]:
                    out = list(views)
                    out[i] = torch.zeros_like(views[i]) if kind == "drop" else \
                        views[i] + view_std[i] * torch.randn(views[i].shape, generator=g)
                    return out + list(views) if keep else out     # gated models: the gate reads the intact views
                policy = _gated_policy_fn(all_fused[name]) if name in GATED else _policy_fn(all_fused[name])
                vals.append(_success(test, policy, ep_test, seed, cfg, transform=tf))
            rob[kind][name] = vals
    res["robust"] = rob
    res["example"] = (test, act)
    return res


def _run(ctx: RunContext) -> ExperimentResult:
    cfg: Config = ctx.config
    seeds = list(range(ctx.seeds))
    rows: list[Row] = []
    tables: dict[str, str] = {}
    verdicts: list[Verdict] = []
    for n_train in cfg.train_maps:
        per_seed = [_run_seed(ctx, cfg, s, n_train) for s in seeds]
        r_rows, r_tables, r_verdicts = _regime_report(ctx, per_seed, n_train)
        rows += r_rows
        tables |= r_tables
        verdicts += r_verdicts
    notes = _notes(cfg)
    config = config_dict(cfg) | {"seeds": seeds, "views": list(VIEWS), "view_family": dict(VIEW_FAMILY),
                                 "categories": list(CATEGORIES), "optimizer": "Adam + cosine schedule",
                                 "start_distance": [6, 32], "view_radius": 10, "quick": ctx.quick}
    return ExperimentResult(rows=rows, paper=[], config=config, tables=tables, notes=notes, verdicts=verdicts)


def _regime_report(ctx: RunContext, per_seed: list[dict], n_train: int) -> tuple[list[Row], dict[str, str], list[Verdict]]:
    """Rows (named ``model [N maps]``), tables, verdicts and plots of one training regime."""
    names = list(per_seed[0]["success"])
    tag = f"{n_train} training maps"
    rows = [Row(f"{n} [{n_train} maps]", {"success_unseen": [r["success"][n] for r in per_seed],
                                          "success_seen": [r["seen"][n] for r in per_seed],
                                          "params": float(per_seed[0]["params"][n])}) for n in names]

    def ms(vals, d=1) -> str:
        mu, sd = mean_std(list(vals))
        return f"{mu:.{d}f} ± {sd:.{d}f}"

    tables: dict[str, str] = {}
    tables[f"{tag}: success rate (%) on unseen and training maps, mean ± std over seeds"] = markdown_table(
        ["model", "unseen maps", "training maps", "parameters"],
        [[n, ms(r.metrics["success_unseen"]), ms(r.metrics["success_seen"]), int(r.metrics["params"])]
         for n, r in zip(names, rows)])
    # situations (families)
    sit_rows = []
    for model in ("action fusion", "action fusion + affinity"):
        for sname in SITUATIONS:
            fam = [_family(r["situations"][model][sname]) for r in per_seed]
            sit_rows.append([model, sname] + [ms([f[k] for f in fam], 2) for k in FAMILIES])
    tables[f"{tag}: fusion weight per view family by situation on the unseen maps (sum of the family's views' mean weights)"] = \
        markdown_table(["model", "situation", *FAMILIES], sit_rows)
    view_rows = []
    for model in ("feature fusion", "action fusion", "action fusion + affinity"):
        view_rows.append([model] + [ms([float(r["mean_weights"][model][i]) for r in per_seed], 2) for i in range(len(VIEWS))])
    tables[f"{tag}: mean fusion weight per view on the unseen maps"] = markdown_table(["model", *VIEWS], view_rows)
    aff = torch.stack([r["affinity"] for r in per_seed]).mean(0)
    tables[f"{tag}: data-driven view affinity A (overlap of the single-view policies on training states, mean over seeds)"] = \
        markdown_table(["", *VIEWS], [[v] + [f"{float(aff[i, j]):.2f}" for j in range(len(VIEWS))] for i, v in enumerate(VIEWS)])
    rob_rows = []
    for kind in ("drop", "noise"):
        for name in (*FUSED, *GATED):
            per_view = [[r["robust"][kind][name][i] for r in per_seed] for i in range(len(VIEWS))]
            full = [r["success"][name] for r in per_seed]
            kept = [_retained(r, kind, name) for r in per_seed]
            rob_rows.append([kind, name, ms(full)] + [ms(v) for v in per_view] + [ms(kept)])
    tables[f"{tag}: robustness, success (%) on unseen maps with one view dropped (zeros) or noised (Gaussian, std of the view)"] = \
        markdown_table(["test-time change", "model", "intact", *[f"{v} changed" for v in VIEWS], "success kept (% of intact, mean over views)"], rob_rows)

    verdicts = [Verdict(f"{tag}: {v.claim}", v.verdict, v.reason) for v in _verdicts(per_seed)]
    _plots(ctx, per_seed, names, n_train)
    return rows, tables, verdicts


def _notes(cfg: Config) -> list[str]:
    return [
        "The paper's success rates are on Gibson scenes with Taskonomy features; they are not comparable with this "
        "procedural stand-in and none are shown. The claims tested are the paper's qualitative findings: the results "
        "in unseen environments (single representations, concat, feature- vs action-level fusion, affinity "
        "regularisation), the per-representation success ranking, the fusion-weight analysis (3D representations in "
        "narrow corridors, semantic ones in open rooms) and the robustness test (representations dropped or noised) "
        "— Shen et al. 2019, results section and figures (recalled, not checked against the paper's text).",
        "Paper setup followed: 8-neighbour (octagonal-style) grid, actions 8 moves + stop, start 6–32 shortest-path steps "
        "from the goal, success within 3 steps of the goal in 39 steps, 1024 test episodes, Adam, batch 256, "
        "supervision from the shortest path, test on unseen environments.",
        "Affinity regulariser: β · w̄ᵀ A w̄ (form 'quadratic' of moekit.layers.fusion.affinity_penalty, diagonal included, "
        f"so it favours a balanced choice across groups of redundant views), β = {cfg.beta}; A from the single-view "
        "policies' overlap on training states (the paper takes A from Taskonomy's task affinities).",
        "Deviation from the paper: every policy also gets a noisy compass to the target (30° noise, 20 % random). "
        "The paper's agent has none; without it a memoryless agent on these maps finds a target outside its line "
        "of sight only by chance: the 'in-sight oracle' row (shortest-path actions while the target is in sight, "
        "a random walk otherwise) measures that ceiling.",
        "Policies sample their actions; the random walk draws one of the 8 moves uniformly and never stops.",
        "Verdict rule (moekit.repro.experiments.verdicts.grade): 'reproduced' when every per-seed difference's mean "
        "minus 2 standard errors is above 0, 'partly' when some is only above 0 on the mean, 'not reproduced' "
        "otherwise; inconclusive with one seed.",
        f"'{FROZEN}': the paper's method — the single-view policies above (each trained on its own), frozen, mixed "
        "at the action level by a gate that reads the intact observation (the stand-in for the paper's RGB image) "
        f"and the goal; only the gate trains. '{GATED_FEATURE}': feature-level fusion with the same gate, trained "
        "end to end. The robustness claims compare these two: a dropped or noised representation reaches the "
        "experts / projections but not the gate. The jointly trained SituationalFusion models read every view in "
        "their gate too, so their robustness rows mix the fusion level with a changed gate input.",
        "Training regimes: each number of training maps trains every model afresh on the first N maps of the same "
        "sequence; the unseen test maps and test episodes are the same in every regime.",
    ]


def _retained(r: dict, kind: str, name: str) -> float:
    """Success with one view changed as a percentage of the intact success, averaged over the views."""
    intact = r["success"][name]
    return 100.0 * sum(r["robust"][kind][name]) / len(VIEWS) / intact if intact > 0 else math.nan


def _above(name: str, diffs: list[float], unit: str = "points") -> Check:
    """'difference > 0' from per-seed differences."""
    return Check(name, diffs, reproduced=0.0, partly=0.0, unit=unit)


def _verdicts(per_seed: list[dict]) -> list[Verdict]:
    num_seeds = len(per_seed)
    succ = lambda n: [r["success"][n] for r in per_seed]  # noqa: E731
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    claims = Claims()
    act = succ("action fusion")
    best = [max(r["success"][f"single: {v}"] for v in VIEWS) for r in per_seed]
    claims.grade("action-level fusion beats every single-representation policy",
                 _above("action fusion − best single view success (paired)", paired(act, best)))
    for other in ("concat", "feature fusion"):
        claims.grade(f"action-level fusion beats {other}",
                     _above(f"action fusion − {other} success (paired)", paired(act, succ(other))))
    gap = {n: [r["seen"][n] - r["success"][n] for r in per_seed] for n in ("concat", "action fusion")}
    claims.grade("action-level fusion overfits the training environments less than concat (smaller seen − unseen gap)",
                 _above("concat − action fusion in (training-map − unseen-map success) (paired)",
                        paired(gap["concat"], gap["action fusion"])))
    aa = succ("action fusion + affinity")
    base = [max(r["success"]["concat"], r["success"]["feature fusion"]) for r in per_seed]
    claims.grade("the full method (action-level fusion + affinity regulariser) beats concat and feature fusion",
                 _above("action fusion + affinity − better of concat / feature fusion (paired)", paired(aa, base)))
    claims.grade("the inter-task affinity regulariser improves action-level fusion",
                 _above("action fusion + affinity − action fusion (paired)", paired(aa, act)))
    fam_best = {f: [max(r["success"][f"single: {v}"] for v in VIEWS if VIEW_FAMILY[v] == f) for r in per_seed]
                for f in FAMILIES}
    d3 = [a - max(b, c) for a, b, c in zip(fam_best["3D"], fam_best["2D"], fam_best["low-level"])]
    dl = [min(r["success"][f"single: {v}"] for v in VIEWS if VIEW_FAMILY[v] != "low-level") - r["success"]["single: vanishing"]
          for r in per_seed]
    claims.grade("single views: 3D representations beat 2D and low-level ones; the low-level one is the weakest",
                 [_above("best 3D − best of 2D / low-level single view", d3),
                  _above("weakest other single view − low-level single view", dl)],
                 note=f"best 3D {mean(fam_best['3D']):.1f} %, semantic {mean(fam_best['semantic']):.1f} %, "
                      f"2D {mean(fam_best['2D']):.1f} %, low-level {mean(fam_best['low-level']):.1f} %")
    for model in ("action fusion", "action fusion + affinity"):
        fam = lambda s, f: [_family(r["situations"][model][s])[f] for r in per_seed]  # noqa: E731
        c3, r3 = fam("corridor", "3D"), fam("room", "3D")
        cs, rs = fam("corridor", "semantic"), fam("clearance ≥3", "semantic")
        top_c = [a - max(fam("corridor", f)[k] for f in FAMILIES if f != "3D") for k, a in enumerate(c3)]
        top_o = [a - max(fam("clearance ≥3", f)[k] for f in FAMILIES if f != "semantic") for k, a in enumerate(rs)]
        vis, hid = fam("room, target visible", "semantic"), fam("room, target not visible", "semantic")
        claims.grade(f"{model}: 3D views weigh most in narrow corridors, the semantic view in open rooms",
                     [_above("3D weight, corridor − room", paired(c3, r3), unit=""),
                      _above("semantic weight, open (clearance ≥3) − corridor", paired(rs, cs), unit=""),
                      _above("3D − largest other family weight in corridors", top_c, unit=""),
                      _above("semantic − largest other family weight in open space", top_o, unit="")],
                     note=f"semantic weight in rooms with the target in sight {mean(vis):.2f}, out of sight "
                          f"{mean(hid):.2f}")
    frozen = succ(FROZEN)
    claims.grade("the paper's form of action-level fusion (independently trained single-view policies, frozen, "
                 "mixed by a gate) beats every single-representation policy",
                 _above(f"{FROZEN} − best single view success (paired)", paired(frozen, best)))
    for kind in ("drop", "noise"):
        kept = {n: [_retained(r, kind, n) for r in per_seed] for n in GATED}
        what = "dropped" if kind == "drop" else "noised"
        claims.grade(f"action-level fusion is more robust than feature-level fusion to one representation {what}",
                     _above(f"{FROZEN} − {GATED_FEATURE} in success kept with one view {what} (% of intact, paired)",
                            paired(kept[FROZEN], kept[GATED_FEATURE])),
                     note="both gates read the intact observation, so the change reaches only the representation")
    rw = succ("random walk")
    worst = [min(r["success"][n] for n in r["success"] if n not in ("random walk", "in-sight oracle")) for r in per_seed]
    claims.grade("every learned policy beats a random walk",
                 _above("worst learned policy − random walk success (paired)", paired(worst, rw)),
                 note=f"over {num_seeds} seeds")
    return claims.verdicts


def _plots(ctx: RunContext, per_seed: list[dict], names: list[str], n_train: int) -> None:
    from moekit.analysis.plots import _plt
    import numpy as np
    plt = _plt()
    # success bars
    fig, ax = plt.subplots(figsize=(9, 4))
    mus = [mean_std([r["success"][n] for r in per_seed]) for n in names]
    seen = [mean_std([r["seen"][n] for r in per_seed]) for n in names]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [m for m, _ in mus], 0.4, yerr=[s for _, s in mus], label="unseen maps", capsize=3)
    ax.bar(x + 0.2, [m for m, _ in seen], 0.4, yerr=[s for _, s in seen], label="training maps", alpha=0.6, capsize=3)
    ax.set_xticks(x, labels=names, rotation=35, ha="right")
    ax.set_ylabel("success rate (%)")
    ax.set_title(f"Navigation success, {n_train} training maps (mean ± std over seeds)")
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    ctx.savefig(fig, f"success_{n_train}maps.png")
    # fusion weights by situation
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, model in zip(axes, ("action fusion", "action fusion + affinity")):
        xs = np.arange(len(SITUATIONS))
        width = 0.8 / len(VIEWS)
        for i, v in enumerate(VIEWS):
            vals = [float(np.nanmean([float(r["situations"][model][s][i]) for r in per_seed])) for s in SITUATIONS]
            ax.bar(xs + (i - (len(VIEWS) - 1) / 2) * width, vals, width, label=f"{v} ({VIEW_FAMILY[v]})")
        ax.set_xticks(xs, labels=SITUATIONS, rotation=35, ha="right")
        ax.set_title(f"{model} ({n_train} training maps): fusion weight by situation", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("fusion weight (unseen maps)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    ctx.savefig(fig, f"fusion_weights_by_situation_{n_train}maps.png")
    # fusion weights on an unseen map
    world, model = per_seed[0]["example"]
    m, c, p = world.states()
    keep = (m == 0) & (c == 0)
    m, c, p = m[keep], c[keep], p[keep]
    with torch.no_grad():
        w = model(*_inputs(world, m, c, p, torch.Generator().manual_seed(0)))[2]
    fig, axes = plt.subplots(1, 3, figsize=(13, 4.4))
    gm = world.maps[0]
    base = np.where(gm.free, 1.0, 0.0)
    axes[0].imshow(base, cmap="gray", vmin=0, vmax=1)
    ys, xs = np.nonzero(gm.objects >= 0)
    for y, xx in zip(ys, xs):
        cat = int(gm.objects[y, xx])
        axes[0].text(xx, y, CATEGORIES[cat][0].upper(), ha="center", va="center", fontsize=7,
                     color="red" if cat == 0 else "blue")
    axes[0].set_title(f"unseen map (target: {CATEGORIES[0]}, red)")
    for ax, fam in zip(axes[1:], ("3D", "semantic")):
        img = np.full(gm.free.shape, np.nan)
        idx = [i for i, v in enumerate(VIEWS) if VIEW_FAMILY[v] == fam]
        vals = w[:, idx].sum(-1).numpy()
        img.reshape(-1)[p.numpy()] = vals
        cmap = plt.get_cmap("viridis").with_extremes(bad="0.8")  # walls and furniture: grey
        im = ax.imshow(img, cmap=cmap, vmin=0, vmax=1)
        ax.set_title(f"action fusion ({n_train} training maps): weight on {fam} views", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    ctx.savefig(fig, f"fusion_weights_map_{n_train}maps.png")
    # robustness
    fig, axes = plt.subplots(1, 2, figsize=(12, 4), sharey=True)
    for ax, kind in zip(axes, ("drop", "noise")):
        xs = np.arange(len(VIEWS) + 1)
        width = 0.8 / len(FUSED)
        for j, name in enumerate(FUSED):
            vals = [float(np.mean([r["success"][name] for r in per_seed]))] + \
                [float(np.mean([r["robust"][kind][name][i] for r in per_seed])) for i in range(len(VIEWS))]
            ax.bar(xs + (j - (len(FUSED) - 1) / 2) * width, vals, width, label=name)
        ax.set_xticks(xs, labels=["intact"] + [f"{v} {kind}ped" if kind == "drop" else f"{v} noised" for v in VIEWS],
                      rotation=30, ha="right")
        ax.set_title(f"{n_train} training maps: one view {'dropped (zeros)' if kind == 'drop' else 'noised'} at test time",
                     fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].set_ylabel("success on unseen maps (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    ctx.savefig(fig, f"robustness_{n_train}maps.png")
    # training curves
    from moekit.analysis import plots
    curves = {n: np.array([r["curves"][n] for r in per_seed]) for n in per_seed[0]["curves"]}
    ctx.savefig(plots.curves(curves, "Training loss: −log Σ π(optimal) (+ affinity penalty)", "step / 50", "loss", logy=True),
                f"train_loss_{n_train}maps.png")


EXPERIMENT = Experiment(
    name="situational-fusion",
    paper=PAPER,
    summary="action-level fusion of representation experts vs single views, concat and feature fusion on unseen procedural maps",
    est_time="~10 min",
    quick_time="<1 min",
    run=_run,
    config=Config,
    default_seeds=3,
    quick_seeds=1,
)
