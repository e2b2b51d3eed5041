"""Token-choice top-k softmax router (Mixtral/GShard/V-MoE family) and Switch (top-1).

Legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _validation as V
from .. import losses as L
from .base import Router
from .plans import TokenChoicePlan


class TopKRouter(Router):
    """``p = softmax(x W + ε)`` over all E experts, keep the top k.

    Options:
      * ``renormalize`` — divide the k kept gates by their sum (Mixtral) or keep them as they are
        (V-MoE, Switch).
      * ``noise_std`` — std of Gaussian noise added to the logits in training (V-MoE uses 1/E;
        ``"1/E"`` is accepted). Enables the V-MoE load loss (``w_load``).
      * ``jitter`` — multiplicative input jitter ``x · Uniform(1−jitter, 1+jitter)`` in training (Switch).
    Losses (uniform keywords): ``w_switch`` (default 1e-2) · E Σ f_i P_i, ``w_z`` · z-loss,
    ``w_importance`` · CV(Σ_x softmax(clean logits))², ``w_load`` · V-MoE load loss.
    """

    default_weights = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 1e-2, "w_z": 0.0}
    has_load_loss = True

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, renormalize: bool = True,
                 noise_std: float | str = 0.0, jitter: float = 0.0, **kwargs):
        if noise_std == "1/E":
            noise_std = 1.0 / V.positive_int("num_experts", num_experts)
        elif isinstance(noise_std, str):
            raise ValueError(f"noise_std: must be a finite non-negative number or '1/E', got {noise_std!r}")
        self.noise_std = V.non_negative_number("noise_std", noise_std)
        self.jitter = V.number_in("jitter", jitter, 0.0, 1.0, high_open=True)
        self.renormalize = V.flag("renormalize", renormalize)
        super().__init__(dim, num_experts, top_k, **kwargs)
        if self.w_load > 0 and self.noise_std == 0:
            raise ValueError("w_load: the V-MoE load loss needs training noise; set noise_std > 0 (e.g. '1/E')")

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", renormalize={self.renormalize}, noise_std={self.noise_std:g}"
                f", jitter={self.jitter:g}")

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> TokenChoicePlan:
        if self.training and self.jitter > 0:
            u = torch.rand(x_TD.shape, generator=generator, device=x_TD.device, dtype=x_TD.dtype)
            x_TD = x_TD * (1.0 - self.jitter + 2.0 * self.jitter * u)
        clean_TE = self.logits(x_TD)
        noisy_TE = None
        if self.training and self.noise_std > 0:
            noisy_TE = clean_TE + self.randn_like(clean_TE, generator) * self.noise_std
        h_TE = clean_TE if noisy_TE is None else noisy_TE
        gates_TE = torch.softmax(h_TE, dim=-1)
        weights_TK, expert_ids_TK = gates_TE.topk(self.top_k, dim=-1)
        priority_T = weights_TK[:, 0]                 # raw top-1 gate, before any renormalisation
        if self.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        # V-MoE's smooth load estimate needs the noise (eval mode or no noise: undefined)
        load_TE = None if noisy_TE is None else L.vmoe_load_per_token(clean_TE, noisy_TE, self.noise_std, self.top_k)
        return TokenChoicePlan(expert_ids=expert_ids_TK, weights=weights_TK, logits=clean_TE,
                               probs=torch.softmax(clean_TE, dim=-1), load=load_TE, priority=priority_T.detach(),
                               noisy_logits=noisy_TE)


class VMoERouter(TopKRouter):
    """V-MoE routing (Riquelme et al. 2021): ``softmax(x W + ε)`` over all E experts with
    ``ε ~ Normal(0, (1/E)²)`` in training, top-k gates *not* renormalised, and the V-MoE balancing losses
    ``0.005 · CV(importance)² + 0.005 · load loss`` (no Switch loss)."""

    default_weights = {"w_importance": 0.005, "w_load": 0.005, "w_switch": 0.0, "w_z": 0.0}

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, **kwargs):
        kwargs.setdefault("renormalize", False)
        kwargs.setdefault("noise_std", "1/E")
        super().__init__(dim, num_experts, top_k, **kwargs)


class SwitchRouter(TopKRouter):
    """Switch Transformer routing: top-1 of ``softmax(x W)``, gate not renormalised
    (output ``p_{i*}(x) E_{i*}(x)``), aux loss ``1e-2 · E Σ f_i P_i``."""

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, **kwargs):
        if top_k != 1 or isinstance(top_k, bool):
            raise ValueError(f"top_k: the switch router is top-1, got {top_k!r}")
        kwargs.setdefault("renormalize", False)
        super().__init__(dim, num_experts, 1, **kwargs)
