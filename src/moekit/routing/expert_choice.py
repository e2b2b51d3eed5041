"""Expert-choice routing (Zhou et al. 2022): each expert picks its top-C tokens.

Legend: T tokens, D model dim, E experts, C capacity (assignments per expert: the tokens each expert
takes), A = E·C assignments.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _validation as V
from .base import Router
from .plans import ExpertChoicePlan


class ExpertChoiceRouter(Router):
    """``s = softmax(x W)`` over experts; expert e takes the C tokens with the highest ``s[:, e]``,
    ``C = ceil(T · c / E)`` (capacity factor c, default 2, capped at T). Balanced by construction,
    so no load loss; a token may get 0, 1 or several experts. Combine weight: ``s[token, e]``.

    The plan carries the A = E·C assignments.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int | None = None, *, capacity_factor: float = 2.0,
                 **kwargs):
        self.capacity_factor = V.positive_number("capacity_factor", capacity_factor)
        if top_k is not None:
            raise ValueError(f"top_k: expert_choice routing has no per-token k; leave top_k=None, got {top_k!r}")
        super().__init__(dim, num_experts, 1, **kwargs)

    kind = "expert_choice"
    supports_capacity = False     # the capacity factor is the router's own (``capacity_factor``)

    def capacity(self, num_tokens: int) -> int:
        """``C = ceil(T · c / E)`` capped at T (0 for an empty batch)."""
        if num_tokens <= 0:
            return 0
        return max(1, min(num_tokens, math.ceil(num_tokens * self.capacity_factor / self.num_experts)))

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> ExpertChoicePlan:
        if group_size is not None:
            raise ValueError("group_size: expert-choice routing picks tokens from the whole batch; use None")
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        T, E = probs_TE.shape
        # C from the real tokens only (a host read: expert choice needs a concrete C for topk).
        C = self.capacity(T if mask_T is None else int(mask_T.sum()))
        scores_TE = probs_TE if mask_T is None else probs_TE.masked_fill(~mask_T[:, None], -1.0)
        _, token_EC = scores_TE.t().topk(C, dim=-1)           # masked tokens (score -1) are never picked
        weight_EC = probs_TE.t().gather(1, token_EC)
        expert_EC = torch.arange(E, device=x_TD.device)[:, None].expand(E, C)
        return ExpertChoicePlan(logits=logits_TE, probs=probs_TE, token_A=token_EC.reshape(-1),
                                expert_A=expert_EC.reshape(-1), weight_A=weight_EC.reshape(-1))
