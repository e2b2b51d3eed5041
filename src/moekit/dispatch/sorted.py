"""Dropless sorted dispatch: group the (token, expert) assignments by expert and run every expert
with grouped matmuls — no per-expert Python loop, no padding, no dropped tokens.

Legend: T tokens, D model dim, E experts, A assignments.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ..experts.bank import ExpertBank


def sorted_dispatch(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                    experts: ExpertBank) -> Tensor:
    """``y_t = Σ_{a: token_a = t} weight_a · expert_{expert_a}(x_t)``."""
    order_A = torch.argsort(expert_A, stable=True)               # group assignments by expert
    token_sorted_A = token_A[order_A]
    counts_E = torch.bincount(expert_A, minlength=experts.num_experts)
    h_AD = experts(x_TD[token_sorted_A], counts_E)               # gather rows, run each expert on its group
    h_AD = h_AD * weight_A[order_A, None].to(h_AD.dtype)         # scale by the combine weight
    return torch.zeros_like(x_TD).index_add(0, token_sorted_A, h_AD)   # scatter-add back to tokens
