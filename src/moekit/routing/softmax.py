"""Dense softmax router: every expert gets every token (classic MoE, K = E).

Legend: T tokens, D model dim, E experts, K experts per token (= E here).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Router
from .plans import TokenChoicePlan


class SoftmaxRouter(Router):
    """``G(x) = softmax(x W)`` over all E experts; the layer computes ``Σ_i G_i(x) E_i(x)``."""

    def __init__(self, dim: int, num_experts: int, top_k: int | None = None, **kwargs):
        if top_k is not None and top_k != num_experts:
            raise ValueError(f"top_k: the dense softmax router uses every expert (top_k = num_experts = "
                             f"{num_experts}) or None, got {top_k!r}")
        super().__init__(dim, num_experts, num_experts, **kwargs)

    supports_capacity = False

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> TokenChoicePlan:
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        expert_ids_TE = torch.arange(E, device=x_TD.device).expand(T, E)
        return TokenChoicePlan(expert_ids=expert_ids_TE, weights=probs_TE, logits=logits_TE, probs=probs_TE)
