"""Soft MoE slot routing (Puigcerver et al. 2023).

Legend: G routing groups (sequences), N tokens per group, D model dim, E experts, S slots per expert,
Z = E·S slots in all, T = G·N tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from .base import Router
from .plans import SoftPlan


class SoftRouter(Router):
    """Per group of N tokens: slot logits ``x Φ`` (N, Z); each slot is a mixture of the group's
    tokens with ``dispatch = softmax over tokens``; each token's output is a mixture of the slot
    outputs with ``combine = softmax over slots``. No token is dropped, no balancing loss.

    With ``normalize=True`` (the paper's recipe for large D) tokens and Φ are L2-normalised along D
    and a learned scalar scales the logits.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int | None = None, *, slots_per_expert: int = 1,
                 normalize: bool = False, **kwargs):
        V.positive_int("slots_per_expert", slots_per_expert)
        if top_k is not None:
            raise ValueError(f"top_k: soft routing has no per-token k; leave top_k=None, got {top_k!r}")
        super().__init__(dim, num_experts, 1, **kwargs)
        self.slots_per_expert = slots_per_expert
        self.normalize = bool(normalize)
        # One gate column per slot (Z = E·S columns); `self.gate` of the base class is unused by soft routing.
        self.gate = nn.Linear(dim, num_experts * slots_per_expert, bias=False)
        nn.init.normal_(self.gate.weight, std=dim ** -0.5)
        self.logit_scale = nn.Parameter(torch.ones(())) if normalize else None

    kind = "soft"
    supports_capacity = False
    groups_by_sequence = True       # the tokens of one sequence share slots

    def slot_logits(self, x_GND: Tensor) -> Tensor:
        if not self.normalize:                # the plain gate GEMM (honours gate_precision)
            G, N, D = x_GND.shape
            Z = self.gate.weight.shape[0]
            return self.assert_finite(self.linear(x_GND.reshape(G * N, D), self.gate.weight).view(G, N, Z))
        w_ZD = self.gate.weight
        dtype = self.routing_dtype(x_GND)
        with torch.autocast(x_GND.device.type, enabled=False):
            x = F.normalize(x_GND.to(dtype), dim=-1)
            w_ZD = F.normalize(w_ZD.to(dtype), dim=-1) * self.logit_scale.to(dtype)
            logits = x @ w_ZD.t()
        return self.assert_finite(logits)

    def slot_weights(self, x_GND: Tensor, mask_GN: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
        """``(dispatch_GN_ES, combine_GN_ES, logits_GN_ES)``; dispatch sums to 1 over the real tokens of a
        group, combine over ES; masked tokens get zero dispatch and combine weight."""
        logits = self.slot_logits(x_GND)
        if mask_GN is None:
            return torch.softmax(logits, dim=-2), torch.softmax(logits, dim=-1), logits
        m = mask_GN[..., None]
        dispatch = torch.softmax(logits.masked_fill(~m, float("-inf")), dim=-2)
        dispatch = torch.where(m, dispatch, torch.zeros_like(dispatch))      # all-masked group: 0, not NaN
        combine = torch.where(m, torch.softmax(logits, dim=-1), torch.zeros_like(logits))
        return dispatch, combine, logits

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> SoftPlan:
        """Slots per group of ``group_size`` tokens (None: all T tokens form one group)."""
        T, D = x_TD.shape
        E, S = self.num_experts, self.slots_per_expert
        N = T if group_size is None else group_size
        G = T // N if N > 0 else 0
        x_GND = x_TD.reshape(G, N, D)
        mask_GN = None if mask_T is None else mask_T.reshape(G, N)
        dispatch_GNZ, combine_GNZ, logits_GNZ = self.slot_weights(x_GND, mask_GN)
        # per-expert logits: the log-sum-exp of the expert's slot logits (its share of the token's softmax)
        logits_TE = torch.logsumexp(logits_GNZ.reshape(T, E, S), dim=-1)
        return SoftPlan(logits=logits_TE, probs=torch.softmax(logits_TE, dim=-1), dispatch_GNZ=dispatch_GNZ,
                        combine_GNZ=combine_GNZ, slots_per_expert=S)
