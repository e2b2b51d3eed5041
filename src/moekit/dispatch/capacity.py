"""Capacity-limited assignment (GShard/V-MoE): each expert takes at most C assignments.

Legend: T tokens, E experts, K experts per token, A = T·K assignments, C capacity.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def expert_capacity(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """``C = ceil(T · k · c / E)`` (V-MoE); at least 1."""
    if not isinstance(capacity_factor, (int, float)) or isinstance(capacity_factor, bool) or capacity_factor <= 0:
        raise ValueError(f"capacity_factor: must be a positive number or None (dropless), got {capacity_factor!r}")
    return max(1, math.ceil(num_tokens * top_k * capacity_factor / num_experts))


def capacity_mask(expert_ids_TK: Tensor, num_experts: int, capacity: int, priority_T: Tensor | None = None) -> Tensor:
    """Which assignments fit: ``keep_TK`` (bool).

    Assignments are served slot by slot — every token's first choice before any second choice — and
    within a slot in token order, or, with Batch Priority Routing, in descending ``priority_T``
    (typically the token's top gate), so at low capacity the least confident tokens are dropped.
    An expert keeps its first ``capacity`` assignments in that order.
    """
    T, K = expert_ids_TK.shape
    device = expert_ids_TK.device
    token_order_T = torch.arange(T, device=device) if priority_T is None else \
        torch.argsort(priority_T, descending=True, stable=True)
    # Flat service order over (slot, token): index into the (T, K) grid.
    tok_KT = token_order_T.expand(K, T)
    slot_KT = torch.arange(K, device=device)[:, None].expand(K, T)
    flat_A = (tok_KT * K + slot_KT).reshape(-1)                 # positions in expert_ids_TK.view(-1)
    expert_A = expert_ids_TK.reshape(-1)[flat_A]
    # Rank of each assignment among those of its expert, in service order.
    by_expert_A = torch.argsort(expert_A, stable=True)
    counts_E = torch.bincount(expert_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    rank_sorted_A = torch.arange(expert_A.numel(), device=device) - starts_E[expert_A[by_expert_A]]
    rank_A = torch.empty_like(rank_sorted_A).scatter_(0, by_expert_A, rank_sorted_A)
    keep_flat = torch.empty(T * K, dtype=torch.bool, device=device)
    keep_flat[flat_A] = rank_A < capacity
    return keep_flat.view(T, K)
