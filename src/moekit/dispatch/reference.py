"""Reference dispatch: every expert on every token, combined by a dense (T, E) weight matrix.

Slow (E times the compute) and obviously right; tests use it as the oracle for the fast paths.
Legend: T tokens, D model dim, E experts, A assignments.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..experts.bank import ExpertBank
from .base import Assignments, TokenDispatcher


def combine_matrix(num_tokens: int, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, num_experts: int) -> Tensor:
    """Dense ``combine_TE[t, e] = Σ_{a: (token_a, expert_a) = (t, e)} weight_a`` (ids ≥ E are ignored)."""
    out_TE = torch.zeros(num_tokens, num_experts + 1, dtype=weight_A.dtype, device=weight_A.device)
    return out_TE.index_put((token_A, expert_A.clamp_max(num_experts)), weight_A, accumulate=True)[:, :num_experts]


def reference_dispatch(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                       experts: ExpertBank) -> Tensor:
    combine_TE = combine_matrix(x_TD.shape[0], token_A, expert_A, weight_A, experts.num_experts)
    y_ETD = experts.forward_dense(x_TD)
    return torch.einsum("te,etd->td", combine_TE.to(y_ETD.dtype), y_ETD)


class ReferenceDispatcher(TokenDispatcher):
    """The dense oracle behind the dispatcher interface: the "rows" are the T tokens themselves, the
    experts run densely on all of them (``forward_dense``), the combine is a dense matrix product."""

    def dispatch(self, x_TD: Tensor, a: Assignments):
        combine_TE = combine_matrix(a.num_tokens, a.token_A, a.expert_A, a.weight_A, a.num_experts)
        counts_E = torch.full((a.num_experts,), a.num_tokens, dtype=torch.long, device=x_TD.device)
        return x_TD, counts_E, combine_TE

    def compute(self, experts: ExpertBank, rows_TD: Tensor, counts_E: Tensor, combine_TE: Tensor) -> Tensor:
        return experts.forward_dense(rows_TD)                       # (E, T, D)

    def combine(self, y_ETD: Tensor, combine_TE: Tensor) -> Tensor:
        return torch.einsum("te,etd->td", combine_TE.to(y_ETD.dtype), y_ETD)
