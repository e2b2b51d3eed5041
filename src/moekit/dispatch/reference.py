"""Reference dispatch: every expert on every token, combined by a dense (T, E) weight matrix.

Slow (E times the compute) and obviously right; tests use it as the oracle for the fast paths.
Legend: T tokens, D model dim, E experts, A assignments.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..experts.bank import ExpertBank
from .base import Assignments, TokenDispatcher


def combine_matrix(a: Assignments) -> Tensor:
    """Dense ``combine_TE[t, e] = Σ_{a: (token_a, expert_a) = (t, e)} weight_a`` (ids ≥ E are ignored)."""
    E = a.num_experts
    out_TE = torch.zeros(a.num_tokens, E + 1, dtype=a.weight_A.dtype, device=a.weight_A.device)
    return out_TE.index_put((a.token_A, a.expert_A.clamp_max(E)), a.weight_A, accumulate=True)[:, :E]


class ReferenceDispatcher(TokenDispatcher):
    """The dense oracle behind the dispatcher interface: the "rows" are the T tokens themselves, the
    experts run densely on all of them, the combine is a dense matrix product
    (:meth:`~moekit.experts.ExpertBank.forward_dense_weighted`)."""

    def dispatch(self, x_TD: Tensor, a: Assignments):
        counts_E = torch.full((a.num_experts,), a.num_tokens, dtype=torch.long, device=x_TD.device)
        return x_TD, counts_E, combine_matrix(a)

    def compute(self, experts: ExpertBank, rows_TD: Tensor, counts_E: Tensor, combine_TE: Tensor) -> Tensor:
        return experts.forward_dense_weighted(rows_TD, combine_TE)

    def combine(self, y_TD: Tensor, combine_TE: Tensor) -> Tensor:
        return y_TD
