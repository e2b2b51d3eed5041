"""Scored top-k router: the selection variants of current MoE language models in one token-choice router.

Legend: T tokens, D model dim, E experts, K experts per token, P expert groups (``n_group``),
Q experts per group (E / P).

``route`` computes, in the routing dtype:

1. logits ``l = x W (+ b)`` — ``bias=True`` adds a trained per-expert router bias (GPT-OSS, Switch
   Transformers with ``router_bias``);
2. scores ``s = softmax(l)`` or ``sigmoid(l)`` (``score``);
3. selection scores ``s + c`` where ``c`` is a per-expert correction bias that is not trained by
   gradients (``selection_bias=True``: DeepSeek-V3's ``e_score_correction_bias`` with sigmoid scores,
   ERNIE-4.5's with softmax scores); :meth:`ScoredTopKRouter.update_bias` nudges it towards balance;
4. group-limited selection (``n_group``, ``topk_group``, DeepSeek-V3): experts form P equal groups;
   each group is scored by the sum of its two best selection scores (its best one when a group holds
   one expert), only the ``topk_group`` best groups stay eligible;
5. the top k eligible experts; their combine weights are the *uncorrected* scores ``s``;
6. renormalisation ``w / max(‖w‖_p, norm_min)`` over the k chosen (``renormalize``: ``False``, ``True``
   = p 1, or a number p — DBRX uses its ``moe_normalize_expert_weights`` p), then ``· scale``
   (DeepSeek-V3's ``routed_scaling_factor``).

Top-k of the renormalised softmax equals a softmax over the k largest logits (GPT-OSS, Granite-MoE);
top-1 with sigmoid scores and no renormalisation is Llama-4's router (its experts take the gate on
the input side: ``MoE(gate_input=True)``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .. import _validation as V
from .base import Router
from .plans import TokenChoicePlan

SCORES = ("softmax", "sigmoid")


class ScoredTopKRouter(Router):
    """Top-k over softmax or sigmoid scores with router bias, selection bias, group-limited selection,
    p-norm renormalisation and a scale (see the module docstring for the order of the steps).

    Losses (uniform keywords): ``w_switch`` · E Σ f_i P_i (P_i from the router's distribution: the
    softmax, or the sigmoid scores normalised to sum 1), ``w_z`` · z-loss, ``w_importance``. The
    default is no loss (the families that use this router balance with a loss of their own choice).
    """

    default_weights = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 0.0, "w_z": 0.0}

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, score: str = "softmax", bias: bool = False,
                 selection_bias: bool = False, bias_update_rate: float = 1e-3, n_group: int = 1,
                 topk_group: int | None = None, renormalize: bool | float = True, norm_min: float = 1e-20,
                 scale: float = 1.0, jitter: float = 0.0, **kwargs):
        V.choice("score", score, SCORES)
        V.positive_int("num_experts", num_experts)
        if not isinstance(n_group, int) or isinstance(n_group, bool) or n_group < 1 or num_experts % n_group:
            raise ValueError(f"n_group: must be a positive int dividing num_experts={num_experts}, got {n_group!r}")
        topk_group = n_group if topk_group is None else topk_group
        V.int_in("topk_group", topk_group, 1, n_group)
        if isinstance(top_k, int) and topk_group * (num_experts // n_group) < top_k:
            raise ValueError(f"topk_group: {topk_group} groups of {num_experts // n_group} experts hold fewer "
                             f"than top_k={top_k} experts")
        if renormalize is True:
            p = 1.0
        elif renormalize is False or renormalize is None:
            p = None
        elif isinstance(renormalize, (int, float)) and math.isfinite(renormalize) and renormalize > 0:
            p = float(renormalize)
        else:
            raise ValueError(f"renormalize: expected True, False or a positive number p (p-norm), got {renormalize!r}")
        for name, v in (("norm_min", norm_min), ("scale", scale), ("bias_update_rate", bias_update_rate)):
            V.non_negative_number(name, v)
        V.number_in("jitter", jitter, 0.0, 1.0, high_open=True)
        V.flag("bias", bias)
        V.flag("selection_bias", selection_bias)
        super().__init__(dim, num_experts, top_k, **kwargs)
        self.score, self.norm_p, self.norm_min, self.scale = score, p, float(norm_min), float(scale)
        self.n_group, self.topk_group = n_group, topk_group
        self.jitter, self.bias_update_rate = float(jitter), float(bias_update_rate)
        self.bias = nn.Parameter(torch.zeros(num_experts)) if bias else None
        self.selection_bias = bool(selection_bias)
        if self.selection_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        #: a torch.distributed process group :meth:`update_bias` sums the counts over (expert parallelism
        #: sets it to the data- and expert-parallel ranks), so every replica takes the same step
        self.bias_group = None

    def extra_repr(self) -> str:
        return (super().extra_repr() + f", score={self.score}, bias={self.bias is not None}, "
                f"selection_bias={self.selection_bias}, n_group={self.n_group}, topk_group={self.topk_group}, "
                f"norm_p={self.norm_p}, scale={self.scale:g}")

    def logits(self, x_TD: Tensor) -> Tensor:
        return self.assert_finite(self.linear(x_TD, self.gate.weight, self.bias))

    def _eligible(self, choice_TE: Tensor) -> Tensor:
        """Group-limited selection: choice scores outside the ``topk_group`` best groups become -inf."""
        T, E = choice_TE.shape
        P = self.n_group
        choice_TPQ = choice_TE.view(T, P, E // P)
        best = min(2, E // P)
        group_TP = choice_TPQ.topk(best, dim=-1).values.sum(-1)
        keep_TP = torch.zeros_like(group_TP, dtype=torch.bool).scatter(
            1, group_TP.topk(self.topk_group, dim=-1).indices, True)
        return choice_TPQ.masked_fill(~keep_TP[:, :, None], float("-inf")).view(T, E)

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> TokenChoicePlan:
        if self.training and self.jitter > 0:
            u = torch.rand(x_TD.shape, generator=generator, device=x_TD.device, dtype=x_TD.dtype)
            x_TD = x_TD * (1.0 - self.jitter + 2.0 * self.jitter * u)
        logits_TE = self.logits(x_TD)
        if self.score == "softmax":
            scores_TE = torch.softmax(logits_TE, dim=-1)
            probs_TE = scores_TE
        else:
            scores_TE = torch.sigmoid(logits_TE)
            probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        choice_TE = scores_TE.detach()
        if self.selection_bias:
            choice_TE = choice_TE + self.expert_bias.to(choice_TE.dtype)
        if self.topk_group < self.n_group:
            choice_TE = self._eligible(choice_TE)
        expert_ids_TK = choice_TE.topk(self.top_k, dim=-1).indices
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        priority_T = scores_TE.detach().max(dim=-1).values
        if self.norm_p is not None:
            norm_T1 = weights_TK.sum(-1, keepdim=True) if self.norm_p == 1.0 else \
                torch.linalg.vector_norm(weights_TK, ord=self.norm_p, dim=-1, keepdim=True)
            weights_TK = weights_TK / norm_T1.clamp_min(self.norm_min)
        if self.scale != 1.0:
            weights_TK = weights_TK * self.scale
        return TokenChoicePlan(expert_ids=expert_ids_TK, weights=weights_TK, logits=logits_TE, probs=probs_TE,
                               priority=priority_T)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor, rate: float | None = None) -> None:
        """One aux-loss-free balancing step of the selection bias (``selection_bias=True``):
        ``c_i ← c_i + u · sign(mean_load − load_i)`` from the last batch's per-expert counts (E,).

        Call it from the training loop after the optimizer step, e.g.
        ``router.update_bias(out.metrics["tokens_per_expert"])``. With ``bias_group`` set the counts are
        summed over that process group first (global counts: every replica takes the same step)."""
        if not self.selection_bias:
            raise ValueError("update_bias: this router has no selection bias; build it with selection_bias=True")
        load_E = torch.as_tensor(tokens_per_expert, dtype=torch.float32, device=self.expert_bias.device)
        if load_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert: expected shape ({self.num_experts},), got {tuple(load_E.shape)}")
        if self.bias_group is not None:
            import torch.distributed as dist
            load_E = load_E.clone()
            dist.all_reduce(load_E, group=self.bias_group)
        u = self.bias_update_rate if rate is None else V.non_negative_number("rate", rate)
        self.expert_bias += u * torch.sign(load_E.mean() - load_E)
