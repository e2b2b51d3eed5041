"""Dropless sorted dispatch as one function (the :class:`~moekit.dispatch.local.LocalDispatcher`
steps in a row), for code that has flat assignments and an expert bank.

Legend: T tokens, D model dim, E experts, A assignments.
"""
from __future__ import annotations

from torch import Tensor

from ..experts.bank import ExpertBank
from .base import Assignments
from .local import LocalDispatcher


def sorted_dispatch(x_TD: Tensor, token_A: Tensor, expert_A: Tensor, weight_A: Tensor,
                    experts: ExpertBank, may_skip: bool = False) -> Tensor:
    """``y_t = Σ_{a: token_a = t} weight_a · expert_{expert_a}(x_t)`` (ids ``== E`` are skipped when
    ``may_skip``)."""
    d = LocalDispatcher()
    a = Assignments(token_A, expert_A, weight_A, x_TD.shape[0], experts.num_experts, may_skip)
    rows, counts, state = d.dispatch(x_TD, a)
    return d.combine(d.compute(experts, rows, counts, state), state)
