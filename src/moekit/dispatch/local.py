"""Local (one-process) dropless dispatch: group the assignments by expert with one stable sort, gather
the rows, run every expert with grouped matmuls, and gather the weighted outputs back to the tokens.

No per-expert Python loop, no padding to a capacity, no host synchronisation, and — for token-choice
grids — no atomics: the dispatch gather's backward and the combine are gathers through the inverse
permutation (:mod:`moekit.dispatch.permute`), so outputs and gradients are bitwise reproducible.
Every shape is fixed by the number of assignments A (dropped or masked assignments are sorted past
the last expert and their rows zeroed, so the experts never read garbage and no gradient flows from
them).

Legend: T tokens, D model dim, E experts, K experts per token, A assignments, R = A rows handed to
the experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Assignments, TokenDispatcher
from .permute import combine_grid, counts_from_sorted, gather_tokens, invert_permutation, permute_rows


@dataclass
class LocalDispatchState:
    order_R: Tensor            # (R,) the assignment each row holds
    inverse_A: Tensor          # (A,) the row of each assignment
    token_R: Tensor | None     # (R,) the token of each row (assignments that are not a grid)
    weight_R: Tensor           # (R,) its combine weight
    valid_R: Tensor | None     # (R,) bool, None when every row is executed
    num_tokens: int
    top_k: int | None


def expert_counts(expert_A: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert (E,) int64, ignoring the not-executed id ``num_experts``; no host read
    (``bincount`` has a data-dependent size)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_A.device)
    counts.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    return counts[:num_experts]


class LocalDispatcher(TokenDispatcher):
    """Dropless sorted dispatch in one process (the default)."""

    def dispatch(self, x_TD: Tensor, a: Assignments) -> tuple[Tensor, Tensor, LocalDispatchState]:
        order_R = torch.argsort(a.expert_A, stable=True)            # group assignments by expert
        inverse_A = invert_permutation(order_R)
        expert_R = a.expert_A.index_select(0, order_R)
        counts_E = counts_from_sorted(expert_R, a.num_experts)
        if a.top_k is not None:                                     # a grid: gather-only backward
            token_R = None
            rows_RD = gather_tokens(x_TD, order_R, inverse_A, a.top_k)
        else:
            token_R = a.token_A.index_select(0, order_R)
            rows_RD = x_TD.index_select(0, token_R)
        weight_R = permute_rows(a.weight_A, order_R, inverse_A)
        valid_R = None
        if a.may_skip:
            valid_R = expert_R < a.num_experts
            rows_RD = torch.where(valid_R[:, None], rows_RD, torch.zeros_like(rows_RD))
        state = LocalDispatchState(order_R, inverse_A, token_R, weight_R, valid_R, a.num_tokens, a.top_k)
        return rows_RD, counts_E, state

    def combine(self, out_RD: Tensor, state: LocalDispatchState) -> Tensor:
        # (padding rows past the last expert were zeroed by the bank's forward_weighted)
        if state.top_k is not None:
            return combine_grid(out_RD, state.order_R, state.inverse_A, state.num_tokens, state.top_k)
        y_TD = out_RD.new_zeros(state.num_tokens, out_RD.shape[-1])
        return y_TD.index_add(0, state.token_R, out_RD)             # any assignments: scatter-add
