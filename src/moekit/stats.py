"""Routing statistics: the per-expert sums every balancing loss is formed from.

Legend (package-wide, see ``moekit/__init__.py``): T tokens, E experts, K experts per token,
G routing groups.

A router turns one batch into :class:`RoutingStats` — sums over the batch's real tokens, kept per
routing group (G = 1 unless the layer routes in groups). Because every field is a *sum*, statistics
of several micro-batches add up (``a + b``) to the statistics of the concatenated batch, and
:meth:`RoutingStats.all_reduce` sums them over a process group (global-batch balancing); the losses in
:mod:`moekit.losses` are then formed from the summed statistics, so the loss of the global batch is
exactly the loss of one big batch. Fields that carry gradients keep them through ``+`` and the
differentiable all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch import Tensor


@dataclass
class RoutingStats:
    """Per-group, per-expert sums over the real (unmasked) tokens of a batch.

    * ``num_tokens`` (G,): real tokens;
    * ``counts`` (G, E): top-k selections per expert (before any capacity limit) — ``f_i`` of the
      Switch loss is ``counts_i / (num_tokens · top_k)``;
    * ``top1_counts`` (G, E): first choices per expert (GShard's ``m_e``);
    * ``prob_sum`` (G, E): ``Σ_x p_i(x)`` of the router's distribution over all experts (``P_i · T``);
    * ``importance`` (G, E): ``Σ_x G(x)_i`` of the gates Shazeer's importance is defined on;
    * ``load`` (G, E) or None: the router's smooth load estimate summed over tokens (Shazeer's
      ``Load(X)``, or V-MoE's load times T), when the router has one;
    * ``z_sum`` (G,): ``Σ_x logsumexp(logits(x))²``.
    """

    num_tokens: Tensor
    counts: Tensor
    top1_counts: Tensor
    prob_sum: Tensor
    importance: Tensor
    z_sum: Tensor
    top_k: int
    load: Tensor | None = None

    @property
    def num_groups(self) -> int:
        return self.counts.shape[0]

    @property
    def num_experts(self) -> int:
        return self.counts.shape[-1]

    def _tensors(self) -> dict[str, Tensor | None]:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "top_k"}

    def _check_compatible(self, other: "RoutingStats") -> None:
        if not isinstance(other, RoutingStats):
            raise TypeError(f"other: expected RoutingStats, got {type(other).__name__}")
        if other.counts.shape != self.counts.shape or other.top_k != self.top_k:
            raise ValueError(f"other: statistics of shape {tuple(other.counts.shape)} (top_k={other.top_k}) "
                             f"cannot be added to {tuple(self.counts.shape)} (top_k={self.top_k})")
        if (self.load is None) != (other.load is None):
            raise ValueError("other: one statistic has a load estimate and the other has none")

    def __add__(self, other: "RoutingStats") -> "RoutingStats":
        """Statistics of two batches routed with the same grouping: the sums add."""
        self._check_compatible(other)
        new = {k: (None if v is None else v + getattr(other, k)) for k, v in self._tensors().items()}
        return replace(self, **new)

    def detach(self) -> "RoutingStats":
        return replace(self, **{k: (None if v is None else v.detach()) for k, v in self._tensors().items()})

    def all_reduce(self, group=None) -> "RoutingStats":
        """Sum every statistic over ``group`` (a ``torch.distributed`` process group; None = the default
        group). Differentiable: the backward sums the gradients over the group too.

        With the loss formed from the reduced statistics on every rank, each rank's backward gives the
        gradient of that rank's share; the all-reduce backward sums those
        shares, so a data-parallel gradient *sum* of the aux loss equals the world size times the
        single-process gradient (a gradient *mean* over ranks, the usual DDP convention, equals it).
        """
        names = [k for k, v in self._tensors().items() if v is not None]
        flat = torch.cat([getattr(self, k).reshape(-1).to(self.counts.dtype) for k in names])
        flat = _AllReduceSum.apply(flat, group)
        out, offset = {}, 0
        for k in names:
            v = getattr(self, k)
            out[k] = flat[offset:offset + v.numel()].view(v.shape).to(v.dtype)
            offset += v.numel()
        return replace(self, **out)

    @staticmethod
    def cat(stats: list["RoutingStats"]) -> "RoutingStats":
        """Stack the groups of several batches (V-MoE's convention: every group is its own queue and
        the losses are averaged over all groups)."""
        if not stats:
            raise ValueError("stats: expected at least one RoutingStats")
        first = stats[0]
        out = {}
        for k, v in first._tensors().items():
            if v is None:
                if any(s.load is not None for s in stats):
                    raise ValueError("stats: mixed statistics with and without a load estimate")
                out[k] = None
            else:
                out[k] = torch.cat([getattr(s, k) for s in stats], dim=0)
        return replace(first, **out)


class _AllReduceSum(torch.autograd.Function):
    """Sum over a process group; the backward sums the gradients the same way (each rank's statistic
    feeds every rank's loss)."""

    @staticmethod
    def forward(ctx, t: Tensor, group) -> Tensor:
        import torch.distributed as dist
        ctx.group = group
        out = t.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, g: Tensor):
        import torch.distributed as dist
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


def group_sum(v_T_: Tensor, group_size: int | None) -> Tensor:
    """Sum per-token values (T, ...) into routing groups (G, ...): one group when ``group_size`` is None."""
    if group_size is None:
        return v_T_.sum(0, keepdim=True)
    return v_T_.reshape(-1, group_size, *v_T_.shape[1:]).sum(1)
