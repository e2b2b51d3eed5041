"""Reference dispatch: every expert on every token, combined by a dense (T, E) weight matrix.

Slow (E times the compute) and obviously right; tests use it as the oracle for the fast paths.
Legend: T tokens, D model dim, E experts, A assignments.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..experts.bank import ExpertBank


def combine_matrix(num_tokens: int, token_A: Tensor, expert_A: Tensor, weight_A: Tensor, num_experts: int) -> Tensor:
    """Dense ``combine_TE[t, e] = Σ_{a: (token_a, expert_a) = (t, e)} weight_a``."""
    out_TE = torch.zeros(num_tokens, num_experts, dtype=weight_A.dtype, device=weight_A.device)
    return out_TE.index_put((token_A, expert_A), weight_A, accumulate=True)


def reference_dispatch(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                       experts: ExpertBank) -> Tensor:
    combine_TE = combine_matrix(x_TD.shape[0], token_A, expert_A, weight_A, experts.num_experts)
    y_ETD = experts.forward_dense(x_TD)
    return torch.einsum("te,etd->td", combine_TE.to(y_ETD.dtype), y_ETD)
