"""Hierarchical sparsely-gated MoE (Shazeer et al. 2017, appendix B), built on the core pieces.

Legend: T tokens, D model dim, H expert hidden dim, P primary groups, B experts per group,
E = P·B experts, K1 groups per token, K2 experts per group, A assignments = T·K1·K2.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import losses as L
from ..dispatch import DISPATCHERS, Assignments, expert_counts
from ..experts import build_experts
from ..routing.base import RoutingDecision, check_top_k, check_weight
from ..routing.noisy_topk import NoisyTopKRouter
from ..types import MoEOutput
from .moe import routing_metrics


class HierarchicalMoE(nn.Module):
    """``y = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_ij(x)`` with noisy top-k gates at both levels.

    The primary gate and the P secondary gates are core :class:`~moekit.routing.NoisyTopKRouter` s
    (zero-initialised, noise only in training, drawn from ``generator`` when given); the E = P·B
    experts run through the core token dispatcher. Balancing uses the hierarchical importance and
    load of the paper:
    ``Importance_H(X)_ij = Σ_x G_primary(x)_i G_i(x)_j`` and
    ``Load_H(X)_ij = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|`` (X^(i): the tokens routed to group i —
    secondary router i sees the others masked out, so its load statistic covers X^(i) only),
    ``aux = w_importance · CV(Importance_H)² + w_load · CV(Load_H)²``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int, top_k_groups: int = 2,
                 top_k_experts: int = 2, *, expert: str = "mlp", activation: str = "relu",
                 w_importance: float = 0.1, w_load: float = 0.1, dispatch: str = "sorted"):
        super().__init__()
        check_top_k(top_k_groups, num_groups)
        check_top_k(top_k_experts, experts_per_group)
        if dispatch not in DISPATCHERS:
            raise ValueError(f"dispatch: expected one of {sorted(DISPATCHERS)}, got {dispatch!r}")
        self.dim, self.P, self.B = dim, num_groups, experts_per_group
        self.k1, self.k2 = top_k_groups, top_k_experts
        self.num_experts = num_groups * experts_per_group
        self.w_importance = check_weight("w_importance", w_importance)
        self.w_load = check_weight("w_load", w_load)
        self.dispatcher = DISPATCHERS[dispatch]()
        # The routers' own losses are off: the hierarchical losses below combine their statistics.
        quiet = dict(w_importance=0.0, w_load=0.0)
        self.primary = NoisyTopKRouter(dim, num_groups, top_k_groups, **quiet)
        self.secondary = nn.ModuleList(NoisyTopKRouter(dim, experts_per_group, top_k_experts, **quiet)
                                       for _ in range(num_groups))
        self.experts = build_experts(expert, self.num_experts, dim, hidden_dim, activation=activation)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, groups={self.P}, experts_per_group={self.B}, top_k_groups={self.k1}, "
                f"top_k_experts={self.k2}")

    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> MoEOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x: expected a floating-point torch.Tensor")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        T, P, B, E = x_TD.shape[0], self.P, self.B, self.num_experts
        mask_T = None if mask is None else torch.broadcast_to(mask, x.shape[:-1]).reshape(-1)

        # Primary gate over groups: (T, K1) groups and gates; its statistics hold Load_primary.
        d1 = self.primary(x_TD, mask_T, generator=generator)
        routed_TP = torch.zeros(T, P, dtype=torch.bool, device=x.device).scatter(1, d1.expert_ids, True)
        if mask_T is not None:
            routed_TP &= mask_T[:, None]
        # Secondary gates: router i routes every token, its statistics count X^(i) only.
        d2 = [self.secondary[i](x_TD, routed_TP[:, i], generator=generator) for i in range(P)]
        sub_TPK2 = torch.stack([d.expert_ids for d in d2], 1)
        subgate_TPK2 = torch.stack([d.weights for d in d2], 1)

        # Assignments: (token, group i in its top K1, expert j in group i's top K2), weight G_i · G_ij.
        idx = d1.expert_ids[..., None].expand(T, self.k1, self.k2)
        expert_TK1K2 = d1.expert_ids[..., None] * B + sub_TPK2.gather(1, idx)
        weight_TK1K2 = d1.weights[..., None] * subgate_TPK2.gather(1, idx)
        if mask_T is not None:
            expert_TK1K2 = torch.where(mask_T[:, None, None], expert_TK1K2, torch.full_like(expert_TK1K2, E))
        token_A = torch.arange(T, device=x.device)[:, None, None].expand_as(expert_TK1K2).reshape(-1)
        a = Assignments(token_A, expert_TK1K2.reshape(-1), weight_TK1K2.reshape(-1), T, E,
                        may_skip=mask_T is not None)
        rows, counts, state = self.dispatcher.dispatch(x_TD, a)                        # dispatch
        y_TD = self.dispatcher.combine(self.dispatcher.compute(self.experts, rows, counts, state), state)

        # Hierarchical importance and load.
        gates_TE = torch.zeros(T, E + 1, dtype=weight_TK1K2.dtype, device=x.device).index_put(
            (token_A, a.expert_A), a.weight_A, accumulate=True)[:, :E]
        importance_E = gates_TE.sum(0)
        load_P = d1.stats.load[0]                                                      # (P,)
        load_PB = torch.stack([d.stats.load[0] for d in d2])                           # (P, B) over X^(i)
        n_P1 = torch.stack([d.stats.num_tokens[0] for d in d2])[:, None].clamp_min(1.0)
        load_E = (load_P[:, None] * load_PB / n_P1).reshape(-1)
        imp_loss, load_loss = L.cv_squared(importance_E), L.cv_squared(load_E)
        aux = self.w_importance * imp_loss + self.w_load * load_loss

        decision = RoutingDecision(expert_ids=expert_TK1K2.reshape(T, -1), weights=weight_TK1K2.reshape(T, -1),
                                   logits=gates_TE, probs=gates_TE, importance_gates=gates_TE)
        metrics = routing_metrics(decision, expert_counts(a.expert_A, E), num_tokens=T, mask_T=mask_T)
        metrics.update(importance_loss=imp_loss.detach(), load_loss=load_loss.detach(),
                       group_load=load_P.detach())
        y_TD = y_TD if mask_T is None else torch.where(mask_T[:, None], y_TD, torch.zeros_like(y_TD))
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), aux, metrics)
