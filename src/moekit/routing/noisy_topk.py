"""Noisy top-k gating of Shazeer et al. 2017 ("Outrageously large neural networks").

Legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import losses as L
from .base import Router
from .plans import TokenChoicePlan


class NoisyTopKRouter(Router):
    """``H(x)_i = (x W_g)_i + ε_i · (softplus((x W_noise)_i) + 1e-2)``, ε ~ Normal(0, 1) in training only;
    ``G(x) = softmax(KeepTopK(H(x), k))`` — a softmax over the k survivors, all others exactly 0.

    ``W_g`` and ``W_noise`` are zero-initialised (as in the paper's code). Losses:
    ``w_importance · CV(Σ_x G(x))²`` and ``w_load · CV(Load(X))²`` with the smooth load estimator
    (:func:`moekit.losses.shazeer_load`). Defaults E=16, k=2, w_importance = w_load = 0.1 (the paper's setup).
    """

    default_weights = {"w_importance": 0.1, "w_load": 0.1, "w_switch": 0.0, "w_z": 0.0}
    has_load_loss = True
    noise_eps = 1e-2

    def __init__(self, dim: int, num_experts: int = 16, top_k: int = 2, **kwargs):
        kwargs.setdefault("zero_init", True)
        super().__init__(dim, num_experts, top_k, **kwargs)
        self.noise = nn.Linear(dim, num_experts, bias=False)
        nn.init.zeros_(self.noise.weight)

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> TokenChoicePlan:
        clean_TE = self.logits(x_TD)
        noisy_TE, std_TE = None, None
        if self.training:
            std_TE = F.softplus(self.linear(x_TD, self.noise.weight)) + self.noise_eps
            noisy_TE = clean_TE + self.randn_like(clean_TE, generator) * std_TE
        h_TE = clean_TE if noisy_TE is None else noisy_TE
        top_vals_TK, expert_ids_TK = h_TE.topk(self.top_k, dim=-1)
        weights_TK = torch.softmax(top_vals_TK, dim=-1)
        gates_TE = torch.zeros_like(h_TE).scatter(1, expert_ids_TK, weights_TK)
        load_TE = L.shazeer_load_per_token(clean_TE, h_TE, std_TE, self.top_k)    # Shazeer's smooth Load(X)
        return TokenChoicePlan(expert_ids=expert_ids_TK, weights=weights_TK, logits=clean_TE,
                               probs=torch.softmax(clean_TE, dim=-1), load=load_TE, gates=gates_TE, noisy_logits=noisy_TE,
                               priority=torch.softmax(h_TE.detach(), dim=-1).max(dim=-1).values)
