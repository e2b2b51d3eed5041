"""Soft MoE slot routing (Puigcerver et al. 2023).

Legend: G groups (sequences), N tokens per group, D model dim, E experts, S slots per expert,
ES = E·S slots in all, T = G·N tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Router, RoutingDecision


class SoftRouter(Router):
    """Per group of N tokens: slot logits ``L = x Φ`` (N, E·S); each slot is a mixture of the group's
    tokens with ``dispatch = softmax over tokens``; each token's output is a mixture of the slot
    outputs with ``combine = softmax over slots``. No token is dropped, no balancing loss.

    With ``normalize=True`` (the paper's recipe for large D) tokens and Φ are L2-normalised along D
    and a learned scalar scales the logits.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int | None = None, *, slots_per_expert: int = 1,
                 normalize: bool = False, **kwargs):
        if not isinstance(slots_per_expert, int) or slots_per_expert < 1:
            raise ValueError(f"slots_per_expert: must be a positive int, got {slots_per_expert!r}")
        if top_k is not None:
            raise ValueError(f"top_k: soft routing has no per-token k; leave top_k=None, got {top_k!r}")
        super().__init__(dim, num_experts, 1, **kwargs)
        self.slots_per_expert = slots_per_expert
        self.normalize = bool(normalize)
        # One gate column per slot (E·S columns); `self.gate` of the base class is unused by soft routing.
        self.gate = nn.Linear(dim, num_experts * slots_per_expert, bias=False)
        nn.init.normal_(self.gate.weight, std=dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.ones(())) if normalize else None

    def slot_logits(self, x_GND: Tensor) -> Tensor:
        w_ESD = self.gate.weight.float()
        x = x_GND.float()
        if self.normalize:
            x = F.normalize(x, dim=-1)
            w_ESD = F.normalize(w_ESD, dim=-1) * self.logit_scale
        logits = x @ w_ESD.t()
        if self.check_finite and not bool(torch.isfinite(logits).all()):
            raise FloatingPointError("SoftRouter: slot logits contain NaN/Inf; refusing to route")
        return logits

    def slot_weights(self, x_GND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(dispatch_GN_ES, combine_GN_ES, logits_GN_ES)``; dispatch sums to 1 over N, combine over ES."""
        logits = self.slot_logits(x_GND)
        return torch.softmax(logits, dim=-2), torch.softmax(logits, dim=-1), logits

    def route(self, x_TD: Tensor) -> RoutingDecision:
        """Routing summary with all T tokens as one group (per-expert view of the slot weights)."""
        _, combine_TES, logits_TES = self.slot_weights(x_TD[None])
        T, E, S = x_TD.shape[0], self.num_experts, self.slots_per_expert
        weights_TE = combine_TES[0].reshape(T, E, S).sum(-1)
        logits_TE = torch.logsumexp(logits_TES[0].reshape(T, E, S), dim=-1)
        return RoutingDecision(expert_ids=torch.arange(E, device=x_TD.device).expand(T, E), weights=weights_TE,
                               logits=logits_TE, probs=weights_TE)
