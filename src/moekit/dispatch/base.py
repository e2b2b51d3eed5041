"""The token-dispatcher interface: dispatch → experts → combine.

Legend: T tokens, D model dim, E experts, A (token, expert) assignments, R rows handed to the experts.

A dispatcher moves token rows to the experts that were assigned them and brings the results back:

* :meth:`TokenDispatcher.dispatch` ``(x_TD, assignments) -> (rows_RD, counts_E, state)`` — rows grouped
  by expert (expert e's ``counts_E[e]`` rows follow expert e−1's; rows past ``counts_E.sum()`` are
  padding the experts need not compute), and whatever state the combine needs;
* :meth:`TokenDispatcher.compute` ``(experts, rows_RD, counts_E, state) -> out_RD`` — runs the expert
  bank (the default calls ``experts(rows, counts)``);
* :meth:`TokenDispatcher.combine` ``(out_RD, state) -> y_TD`` — weights each row by its combine weight
  and sums it back into its token.

The local dispatcher keeps everything in one process; an all-to-all dispatcher sends rows to the
process that owns their expert inside ``dispatch`` and back inside ``combine``, so ``MoE`` never
changes. Routing policy (capacity, masks) happens before dispatch: an assignment whose expert id is
``E`` (one past the last expert) is not executed and contributes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from ..experts.bank import ExpertBank


@dataclass
class Assignments:
    """Flat (token, expert, weight) assignments of a batch of ``num_tokens`` tokens.

    ``expert_A == num_experts`` marks an assignment that is not executed (dropped by a capacity limit or
    belonging to a masked token); ``may_skip`` says whether any such entry can occur (so the dispatcher
    knows whether it must zero the padding rows — a Python flag, no host synchronisation).
    """
    token_A: Tensor
    expert_A: Tensor
    weight_A: Tensor
    num_tokens: int
    num_experts: int
    may_skip: bool = False


class TokenDispatcher:
    """Base class: see the module docstring for the contract."""

    def dispatch(self, x_TD: Tensor, assignments: Assignments) -> tuple[Tensor, Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def compute(self, experts: ExpertBank, rows_RD: Tensor, counts_E: Tensor, state: Any) -> Tensor:
        return experts(rows_RD, counts_E)

    def combine(self, out_RD: Tensor, state: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError
