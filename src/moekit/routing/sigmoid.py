"""Sigmoid scoring with auxiliary-loss-free bias balancing (DeepSeek-V3).

Legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .base import Router, RoutingDecision


class SigmoidRouter(Router):
    """Scores ``s = sigmoid(x W)``; the top k are chosen on ``s + b`` where ``b`` is a per-expert bias
    that is *not* trained by gradients: :meth:`update_bias` nudges it after each step,
    ``b_i ← b_i + u · sign(mean_load − load_i)``. Combine weights use the unbiased scores, normalised
    over the k chosen (``normalize=True``) and multiplied by ``scale``.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, bias_update_rate: float = 1e-3,
                 normalize: bool = True, scale: float = 1.0, **kwargs):
        if not isinstance(bias_update_rate, (int, float)) or bias_update_rate < 0:
            raise ValueError(f"bias_update_rate: must be a non-negative number, got {bias_update_rate!r}")
        super().__init__(dim, num_experts, top_k, **kwargs)
        self.bias_update_rate = float(bias_update_rate)
        self.normalize = bool(normalize)
        self.scale = float(scale)
        self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        #: a torch.distributed process group: update_bias sums the counts over it (set by expert_parallel)
        self.bias_group = None

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> RoutingDecision:
        logits_TE = self.logits(x_TD)
        scores_TE = torch.sigmoid(logits_TE)
        _, expert_ids_TK = (scores_TE.detach() + self.expert_bias.to(scores_TE.dtype)).topk(self.top_k, dim=-1)
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        priority_T = weights_TK.detach().max(dim=-1).values
        if self.normalize:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        weights_TK = weights_TK * self.scale
        probs_TE = scores_TE / (scores_TE.sum(dim=-1, keepdim=True) + 1e-20)
        return RoutingDecision(expert_ids=expert_ids_TK, weights=weights_TK, logits=logits_TE, probs=probs_TE,
                               priority=priority_T)

    @torch.no_grad()
    def update_bias(self, tokens_per_expert: Tensor, rate: float | None = None) -> None:
        """One aux-loss-free balancing step from the last batch's per-expert token counts (E,).

        Call it from the training loop after the optimizer step, e.g.
        ``router.update_bias(out.metrics["tokens_per_expert"])``. With ``bias_group`` set (expert
        parallelism sets it) the counts are summed over that process group first.
        """
        load_E = torch.as_tensor(tokens_per_expert, dtype=torch.float32, device=self.expert_bias.device)
        if load_E.shape != (self.num_experts,):
            raise ValueError(f"tokens_per_expert: expected shape ({self.num_experts},), got {tuple(load_E.shape)}")
        if self.bias_group is not None:          # global counts: every rank takes the same step
            import torch.distributed as dist
            load_E = load_E.clone()
            dist.all_reduce(load_E, group=self.bias_group)
        u = self.bias_update_rate if rate is None else float(rate)
        self.expert_bias += u * torch.sign(load_E.mean() - load_E)
