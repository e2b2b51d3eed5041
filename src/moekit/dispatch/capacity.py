"""Capacity-limited assignment (GShard / V-MoE): each expert takes at most C assignments per group.

Legend: T tokens, E experts, K experts per token, A = T·K assignments, C capacity, G routing groups,
N tokens per group; the queues are the G·E (group, expert) pairs.

Capacity formula (moekit's default): ``C = max(1, ceil(N · k · c / E))`` for a group of N real tokens,
k experts per token and capacity ratio c. V-MoE additionally rounds C up to a multiple of 4 by
default (``capacity_multiple_of=4`` reproduces it); moekit does not, because that rounding raises the
effective ratio (by up to 31 % at small capacities in V-MoE's own experiments).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _validation as V
from ..config import CapacityConfig


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float,
                    multiple_of: int = 1) -> int:
    """``C = ceil(T · k · c / E)``, rounded up to a multiple of ``multiple_of``; at least 1."""
    V.positive_number("capacity_factor", capacity_factor)
    V.positive_int("capacity_multiple_of", multiple_of)
    c = max(1, math.ceil(num_tokens * top_k * capacity_factor / num_experts))
    return -(-c // multiple_of) * multiple_of


def expert_capacity_tensor(num_tokens_G: Tensor, top_k: int, num_experts: int, capacity_factor: float,
                           multiple_of: int = 1) -> Tensor:
    """:func:`expert_capacity` for a tensor of per-group token counts, without leaving the device.
    Capped at the group's token count (an expert takes at most one assignment per token), so a huge
    ratio means "drop nothing" and never overflows the int64 conversion."""
    n_G = num_tokens_G.to(torch.float64)
    c = torch.minimum(torch.ceil(n_G * top_k * capacity_factor / num_experts), n_G).clamp_min(1)
    return (torch.ceil(c / multiple_of) * multiple_of).to(torch.long)


def capacity_mask(expert_ids_TK: Tensor, num_experts: int, capacity: int | Tensor,
                  priority_T: Tensor | None = None) -> Tensor:
    """Which assignments fit: ``keep_TK`` (bool).

    Assignments are served slot by slot — every token's first choice before any second choice — and
    within a slot in token order, or, with Batch Priority Routing, in descending ``priority_T``
    (stable: ties keep token order), so at low capacity the least confident tokens are dropped.
    Queue ``q`` keeps its first ``capacity`` (an int, or a per-queue tensor, one entry per queue) assignments in that
    order. Ids ``>= num_experts`` are queues of their own that keep nothing.
    """
    T, K = expert_ids_TK.shape
    device = expert_ids_TK.device
    token_order_T = torch.arange(T, device=device) if priority_T is None else \
        torch.argsort(priority_T, descending=True, stable=True)
    # Flat service order over (slot, token): index into the (T, K) grid.
    tok_KT = token_order_T.expand(K, T)
    slot_KT = torch.arange(K, device=device)[:, None].expand(K, T)
    flat_A = (tok_KT * K + slot_KT).reshape(-1)                 # positions in expert_ids_TK.view(-1)
    queue_A = expert_ids_TK.reshape(-1)[flat_A].clamp_max(num_experts)
    # Rank of each assignment among those of its queue, in service order.
    by_queue_A = torch.argsort(queue_A, stable=True)
    queue_counts = torch.zeros(num_experts + 1, dtype=torch.long, device=device).scatter_add_(
        0, queue_A, torch.ones_like(queue_A))
    queue_starts = torch.cumsum(queue_counts, 0) - queue_counts
    rank_sorted_A = torch.arange(queue_A.numel(), device=device) - queue_starts[queue_A[by_queue_A]]
    rank_A = torch.empty_like(rank_sorted_A).scatter_(0, by_queue_A, rank_sorted_A)
    if isinstance(capacity, Tensor):
        queue_cap = torch.cat([capacity.to(device=device, dtype=torch.long), capacity.new_zeros(1).to(device)])
        fits_A = rank_A < queue_cap[queue_A]
    else:
        fits_A = rank_A < capacity
    fits_A = fits_A & (queue_A < num_experts)
    keep_flat = torch.empty(T * K, dtype=torch.bool, device=device)
    keep_flat[flat_A] = fits_A
    return keep_flat.view(T, K)


def capacity_keep(expert_ids_TK: Tensor, num_experts: int, capacity_factor: float | None = None, *,
                  capacity: int | None = None, mask_T: Tensor | None = None, group_size: int | None = None,
                  priority_T: Tensor | None = None, multiple_of: int = 1) -> Tensor:
    """``keep_TK`` for a capacity ratio or an absolute capacity (exactly one of them): per routing group
    of ``group_size`` consecutive tokens (one group when None), each expert takes
    ``C = expert_capacity(real tokens of the group, K, E, c)`` assignments, or ``capacity`` of them.
    Masked tokens (``mask_T`` False) take no slot and count in no capacity."""
    if (capacity_factor is None) == (capacity is None):
        raise ValueError("capacity_keep: give exactly one of capacity_factor and capacity")
    T, K = expert_ids_TK.shape
    E = num_experts
    N = T if group_size is None else group_size
    G = T // N if N > 0 else 0
    group_T = torch.arange(T, device=expert_ids_TK.device) // max(N, 1)
    # (group, expert) pairs are independent queues: expert e of group g becomes queue g·E + e.
    queue_TK = expert_ids_TK + (group_T * E)[:, None]
    if mask_T is not None:
        queue_TK = torch.where(mask_T[:, None], queue_TK, torch.full_like(queue_TK, G * E))
    if capacity is not None:
        return capacity_mask(queue_TK, G * E, capacity, priority_T)
    if mask_T is None:
        real_G = torch.full((G,), float(N), device=expert_ids_TK.device)
    else:
        real_G = mask_T.reshape(G, N).sum(-1).to(torch.float64) if G else mask_T.new_zeros(0, dtype=torch.float64)
    cap_G = expert_capacity_tensor(real_G, K, E, capacity_factor, multiple_of)
    return capacity_mask(queue_TK, G * E, cap_G.repeat_interleave(E), priority_T)


class CapacityPolicy:
    """Which token-choice assignments the experts take, built from a :class:`~moekit.config.CapacityConfig`:
    dropless (every assignment of a real token), a capacity ratio or an absolute capacity per routing
    group, served first choices first (or by descending top-1 gate with Batch Priority Routing).

    :meth:`keep` returns ``keep_TK`` (bool) or None when every assignment is kept."""

    def __init__(self, config: CapacityConfig | None = None):
        self.config = CapacityConfig() if config is None else config
        if not isinstance(self.config, CapacityConfig):
            raise TypeError(f"capacity: expected a CapacityConfig, got {type(self.config).__name__}")

    @property
    def dropless(self) -> bool:
        return self.config.dropless

    def keep(self, expert_ids_TK: Tensor, num_experts: int, *, mask_T: Tensor | None = None,
             group_size: int | None = None, priority_T=None) -> Tensor | None:
        """``priority_T``: the Batch Priority Routing key (T,), or a function returning it (only called
        when batch priority is on)."""
        cfg = self.config
        if cfg.batch_priority and callable(priority_T):
            priority_T = priority_T()
        if cfg.dropless:                                        # padding is never routed
            return None if mask_T is None else mask_T[:, None].expand(expert_ids_TK.shape)
        return capacity_keep(expert_ids_TK, num_experts, cfg.factor, capacity=cfg.absolute, mask_T=mask_T,
                             group_size=group_size, priority_T=priority_T if cfg.batch_priority else None,
                             multiple_of=cfg.multiple_of)

    def __repr__(self) -> str:
        c = self.config
        if c.dropless:
            return "CapacityPolicy(dropless)"
        what = f"factor={c.factor:g}, multiple_of={c.multiple_of}" if c.factor is not None else f"capacity={c.absolute}"
        return f"CapacityPolicy({what}, batch_priority={c.batch_priority})"
