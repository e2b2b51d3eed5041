"""Local (one-process) dropless dispatch: sort the assignments by expert, gather the rows, run every
expert with grouped matmuls, scale by the combine weights and scatter-add back to the tokens.

No per-expert Python loop, no padding to a capacity, no host synchronisation: every shape is fixed by
the number of assignments A (dropped or masked assignments are sorted past the last expert and their
rows are zeroed, so the experts never read garbage and no gradient flows from them).

Legend: T tokens, D model dim, E experts, A assignments, R = A rows handed to the experts.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Assignments, TokenDispatcher


@dataclass
class LocalDispatchState:
    token_R: Tensor            # (R,) the token each row came from
    weight_R: Tensor           # (R,) its combine weight
    valid_R: Tensor | None     # (R,) bool, None when every row is executed
    num_tokens: int


def expert_counts(expert_A: Tensor, num_experts: int) -> Tensor:
    """Assignments per expert (E,) int64, ignoring the not-executed id ``num_experts``; sync-free
    (``bincount`` has a data-dependent size)."""
    counts = torch.zeros(num_experts + 1, dtype=torch.long, device=expert_A.device)
    counts.scatter_add_(0, expert_A, torch.ones_like(expert_A))
    return counts[:num_experts]


class LocalDispatcher(TokenDispatcher):
    """Dropless sorted dispatch in one process (the default)."""

    def dispatch(self, x_TD: Tensor, a: Assignments) -> tuple[Tensor, Tensor, LocalDispatchState]:
        order_R = torch.argsort(a.expert_A, stable=True)            # group assignments by expert
        token_R = a.token_A[order_R]
        counts_E = expert_counts(a.expert_A, a.num_experts)
        rows_RD = x_TD.index_select(0, token_R)                     # gather (faster than x_TD[token_R])
        valid_R = None
        if a.may_skip:
            valid_R = a.expert_A[order_R] < a.num_experts
            rows_RD = torch.where(valid_R[:, None], rows_RD, torch.zeros_like(rows_RD))
        return rows_RD, counts_E, LocalDispatchState(token_R, a.weight_A[order_R], valid_R, a.num_tokens)

    def combine(self, out_RD: Tensor, state: LocalDispatchState) -> Tensor:
        if state.valid_R is not None:      # padding rows past the last expert: never computed, never used
            # (zeroed *before* the weight multiply: the weight's gradient reads these rows)
            out_RD = torch.where(state.valid_R[:, None], out_RD, torch.zeros_like(out_RD))
        out_RD = out_RD * state.weight_R[:, None].to(out_RD.dtype)   # scale by the combine weight
        y_TD = out_RD.new_zeros(state.num_tokens, out_RD.shape[-1])
        return y_TD.index_add(0, state.token_R, out_RD)             # scatter-add back to tokens
