"""Hierarchical sparsely-gated MoE (Shazeer et al. 2017, appendix B).

Legend: T tokens, D model dim, H expert hidden dim, P primary groups, B experts per group,
E = P·B experts, K1 groups per token, K2 experts per group, A assignments = T·K1·K2.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses as L
from ..dispatch import reference_dispatch, sorted_dispatch
from ..experts import build_experts
from ..types import MoEOutput
from .moe import routing_metrics
from ..routing.base import RoutingDecision, check_top_k, check_weight


def _noisy_topk(clean_TN: Tensor, noise_TN: Tensor | None, k: int):
    """Shazeer's noisy top-k: returns (noisy logits, noise std, ids (T,k), renormalised gates (T,k))."""
    if noise_TN is None:
        noisy, std = clean_TN, None
    else:
        std = F.softplus(noise_TN) + 1e-2
        noisy = clean_TN + torch.randn_like(clean_TN) * std
    vals, ids = noisy.topk(k, dim=-1)
    return noisy, std, ids, torch.softmax(vals, dim=-1)


class HierarchicalMoE(nn.Module):
    """``y = Σ_i Σ_j G_primary(x)_i · G_i(x)_j · E_ij(x)`` with noisy top-k gates at both levels.

    Balancing uses the hierarchical importance and load of the paper:
    ``Importance_H(X)_ij = Σ_x G_primary(x)_i G_i(x)_j`` and
    ``Load_H(X)_ij = Load_primary(X)_i · Load_i(X^(i))_j / |X^(i)|`` (X^(i): the tokens routed to group i),
    ``aux = w_importance · CV(Importance_H)² + w_load · CV(Load_H)²``.
    """

    def __init__(self, dim: int, hidden_dim: int, num_groups: int, experts_per_group: int, top_k_groups: int = 2,
                 top_k_experts: int = 2, *, expert: str = "mlp", activation: str = "relu",
                 w_importance: float = 0.1, w_load: float = 0.1, dispatch: str = "sorted"):
        super().__init__()
        check_top_k(top_k_groups, num_groups)
        check_top_k(top_k_experts, experts_per_group)
        if dispatch not in ("sorted", "reference"):
            raise ValueError(f"dispatch: expected 'sorted' or 'reference', got {dispatch!r}")
        self.dim, self.P, self.B = dim, num_groups, experts_per_group
        self.k1, self.k2 = top_k_groups, top_k_experts
        self.num_experts = num_groups * experts_per_group
        self.w_importance = check_weight("w_importance", w_importance)
        self.w_load = check_weight("w_load", w_load)
        self.dispatch = dispatch
        # Zero-initialised gate and noise matrices, as in the flat noisy top-k router.
        self.w_gate_primary = nn.Parameter(torch.zeros(dim, num_groups))
        self.w_noise_primary = nn.Parameter(torch.zeros(dim, num_groups))
        self.w_gate_secondary = nn.Parameter(torch.zeros(num_groups, dim, experts_per_group))
        self.w_noise_secondary = nn.Parameter(torch.zeros(num_groups, dim, experts_per_group))
        self.experts = build_experts(expert, self.num_experts, dim, hidden_dim, activation=activation)

    def forward(self, x: Tensor) -> MoEOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x: expected a floating-point torch.Tensor")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        T, P, B = x_TD.shape[0], self.P, self.B
        xf = x_TD.float()
        train = self.training

        # Primary gate over groups.
        clean_TP = xf @ self.w_gate_primary
        noisy_TP, std_TP, group_TK1, gate_TK1 = _noisy_topk(clean_TP, xf @ self.w_noise_primary if train else None,
                                                             self.k1)
        # Secondary gates: every group's logits for every token (one batched matmul), (T, P, B).
        clean_TPB = torch.einsum("td,pdb->tpb", xf, self.w_gate_secondary)
        noise_TPB = torch.einsum("td,pdb->tpb", xf, self.w_noise_secondary) if train else None
        noisy_TPB, std_TPB, sub_TPK2, subgate_TPK2 = _noisy_topk(clean_TPB, noise_TPB, self.k2)

        # Assignments: (token, group i in its top K1, expert j in group i's top K2), weight G_i · G_ij.
        sub_TK1K2 = sub_TPK2.gather(1, group_TK1[..., None].expand(T, self.k1, self.k2))
        subgate_TK1K2 = subgate_TPK2.gather(1, group_TK1[..., None].expand(T, self.k1, self.k2))
        expert_TK1K2 = group_TK1[..., None] * B + sub_TK1K2
        weight_TK1K2 = gate_TK1[..., None] * subgate_TK1K2
        token_A = torch.arange(T, device=x.device)[:, None, None].expand_as(expert_TK1K2).reshape(-1)
        expert_A, weight_A = expert_TK1K2.reshape(-1), weight_TK1K2.reshape(-1)
        run = sorted_dispatch if self.dispatch == "sorted" else reference_dispatch
        y_TD = run(x_TD, token_A, expert_A, weight_A.to(x.dtype), self.experts)

        # Hierarchical importance and load.
        gates_TE = torch.zeros(T, self.num_experts, device=x.device).index_put(
            (token_A, expert_A), weight_A, accumulate=True)
        importance_E = gates_TE.sum(0)
        load_P = L.shazeer_load(clean_TP, noisy_TP, std_TP, self.k1)                       # (P,)
        routed_TP = torch.zeros(T, P, dtype=torch.bool, device=x.device).scatter(1, group_TK1, True)
        load_PB = []
        for i in range(P):   # P is small (the paper uses tens of groups); per-group load needs X^(i)
            rows = routed_TP[:, i]
            n_i = int(rows.sum())
            if n_i == 0:
                load_PB.append(torch.zeros(B, device=x.device))
                continue
            li = L.shazeer_load(clean_TPB[rows, i], noisy_TPB[rows, i],
                                None if std_TPB is None else std_TPB[rows, i], self.k2)
            load_PB.append(load_P[i] * li / n_i)
        load_E = torch.stack(load_PB).reshape(-1)
        imp_loss, load_loss = L.cv_squared(importance_E), L.cv_squared(load_E)
        aux = self.w_importance * imp_loss + self.w_load * load_loss

        decision = RoutingDecision(expert_ids=expert_TK1K2.reshape(T, -1), weights=weight_TK1K2.reshape(T, -1),
                                   logits=clean_TPB.reshape(T, -1), probs=gates_TE, importance_gates=gates_TE)
        metrics = routing_metrics(decision, torch.bincount(expert_A, minlength=self.num_experts), 0, expert_A.numel())
        metrics.update(importance_loss=imp_loss.detach(), load_loss=load_loss.detach(),
                       group_load=load_P.detach())
        return MoEOutput(y_TD.view(x.shape), aux, metrics)
