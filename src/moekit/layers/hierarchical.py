"""Hierarchical sparsely-gated MoE (Shazeer et al. 2017, appendix B), built on the core pieces.

Legend (the package's, ``moekit/__init__.py``): T tokens, D model dim, H expert hidden dim, P expert groups
(the primary gate's choices), Q experts per group, E = P·Q experts, K experts per token (= k1·k2: the top
k1 groups of each token, the top k2 experts of each chosen group), R rows handed to the groups' gates (the
T·k1 chosen (token, group) pairs, grouped by group: the primary level's experts are the groups).
``self.P`` and ``self.B`` are the numbers of groups and of experts per group (attribute names kept).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from .. import losses as L
from ..dispatch import DISPATCHERS, CapacityPolicy, counts_from_sorted, invert_permutation, permute_rows
from ..experts import build_experts, grouped_mm
from ..routing.base import check_top_k
from ..routing.noisy_topk import NoisyTopKRouter
from ..routing.plans import TokenChoicePlan
from ..types import MoEOutput


class HierarchicalMoE(nn.Module):
    """``y = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_ij(x)`` with noisy top-k gates at both levels.

    The primary gate and the P secondary gates are core :class:`~moekit.routing.NoisyTopKRouter` s
    (zero-initialised, noise only in training, drawn from ``generator`` when given). A secondary gate
    is computed only for the groups a token was routed to — T·k1 rows through one grouped matmul, not
    T·P — so the routing cost does not grow with the number of groups. The two levels form a
    token-choice plan over the E = P·Q experts (combine weight ``G_i · G_ij``, router distribution
    ``softmax_primary(x)_i · softmax_i(x)_j``) that runs through the core dispatcher. Balancing uses the hierarchical importance and
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
        self.w_importance = V.non_negative_number("w_importance", w_importance)
        self.w_load = V.non_negative_number("w_load", w_load)
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
        T, P, Q, E = x_TD.shape[0], self.P, self.B, self.num_experts
        mask_T = None if mask is None else torch.broadcast_to(mask, x.shape[:-1]).reshape(-1)

        # Primary gate over groups: (T, k1) groups and gates; its statistics hold Load_primary.
        d1 = self.primary(x_TD, mask_T, generator=generator)
        k1, k2 = self.k1, self.k2
        # Secondary gates for the chosen (token, group) pairs only, slot-major r = k1·T + t, by group.
        group_R = d1.expert_ids.t().reshape(-1)
        order_R = torch.argsort(group_R, stable=True)
        inverse_R = invert_permutation(order_R)
        counts_P = counts_from_sorted(group_R.index_select(0, order_R), P)
        rows_RD = x_TD.index_select(0, torch.remainder(order_R, max(T, 1)))
        dt = self.primary.routing_dtype(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
            rows_RD = rows_RD.to(dt)

            def logits(weights):             # (P, Q, D) gate matrices -> (R, Q) logits in pair order
                out_RQ = grouped_mm(rows_RD, torch.stack(list(weights)).to(dt).transpose(1, 2), counts_P)
                return permute_rows(out_RQ, inverse_R, order_R)

            clean_RQ = self.primary.assert_finite(logits(r.gate.weight for r in self.secondary))
            std_RQ = noisy_RQ = None
            if self.training:
                std_RQ = F.softplus(logits(r.noise.weight for r in self.secondary)) + NoisyTopKRouter.noise_eps
                noisy_RQ = clean_RQ + self.primary.randn_like(clean_RQ, generator) * std_RQ
        h_RQ = clean_RQ if noisy_RQ is None else noisy_RQ
        top_vals, sub_ids = h_RQ.topk(k2, dim=-1)                  # (R, k2) each
        subgates = torch.softmax(top_vals, dim=-1)
        real_R = torch.ones_like(group_R, dtype=clean_RQ.dtype) if mask_T is None else mask_T.to(clean_RQ.dtype).repeat(k1)
        # Load_i(X^(i))_j: the secondary smooth load summed over the tokens routed to group i.
        load_RQ = L.shazeer_load_per_token(clean_RQ, h_RQ, std_RQ, k2) * real_R[:, None]
        load_PQ = torch.zeros(P, Q, dtype=load_RQ.dtype, device=x.device).index_add(0, group_R, load_RQ)
        n_P = torch.zeros(P, dtype=load_RQ.dtype, device=x.device).index_add(0, group_R, real_R)

        # Assignments (token, group i in its top k1, expert j in group i's top k2), weight G_i · G_ij:
        # (T, k1, k2) expert ids and weights.
        picked_ids = (group_R[:, None] * Q + sub_ids).view(k1, T, k2).permute(1, 0, 2)
        picked_weights = d1.weights[..., None] * subgates.view(k1, T, k2).permute(1, 0, 2)
        # Both levels renormalise over their top k, so the gates G_i·G_ij form a distribution over the
        # E experts: it is the plan's router distribution (its log stands for the logits).
        gates_TE = torch.zeros(T, E, dtype=picked_weights.dtype, device=x.device).scatter(
            1, picked_ids.reshape(T, -1), picked_weights.reshape(T, -1))
        plan = TokenChoicePlan(logits=torch.log(gates_TE.clamp_min(1e-30)), probs=gates_TE,
                               expert_ids=picked_ids.reshape(T, -1), weights=picked_weights.reshape(T, -1), gates=gates_TE)
        y_TD, metrics = plan.run(x_TD, self.experts, self.dispatcher, CapacityPolicy(), mask_T=mask_T)

        # Hierarchical importance and load.
        importance_E = (gates_TE if mask_T is None else gates_TE * mask_T[:, None]).sum(0)
        load_P = d1.stats.load[0]                                                      # (P,)
        load_E = (load_P[:, None] * load_PQ / n_P[:, None].clamp_min(1.0)).reshape(-1)
        imp_loss, load_loss = L.cv_squared(importance_E), L.cv_squared(load_E)
        aux = self.w_importance * imp_loss + self.w_load * load_loss
        metrics.update(importance_loss=imp_loss.detach(), load_loss=load_loss.detach(), group_load=load_P.detach())
        y_TD = y_TD if mask_T is None else torch.where(mask_T[:, None], y_TD, torch.zeros_like(y_TD))
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), aux, metrics)
