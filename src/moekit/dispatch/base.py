"""The token-dispatcher interface: dispatch → experts → combine.

A dispatcher moves token rows to the experts that were assigned them and brings the results back:

* :meth:`TokenDispatcher.dispatch` ``(x_TD, assignments) -> (rows_RD, counts_E, state)`` — rows grouped
  by expert (expert e's ``counts_E[e]`` rows follow expert e−1's; rows past ``counts_E.sum()`` are
  padding the experts need not compute), and whatever state the combine needs;
* :meth:`TokenDispatcher.compute` ``(experts, rows_RD, counts_E, state) -> out_RD`` — runs the expert
  bank on the rows and applies each row's combine weight (``experts.forward_weighted``: on the output,
  or on the input for banks that gate their input); the default reads ``state.weight_R`` and
  ``state.valid_R`` (None when every row is executed);
* :meth:`TokenDispatcher.combine` ``(out_RD, state) -> y_TD`` — sums each token's weighted rows.

Calling the dispatcher, ``dispatcher(x_TD, assignments, experts)``, runs the three in a row.

The local dispatcher keeps everything in one process; an all-to-all dispatcher sends rows to the
process that owns their expert inside ``dispatch`` and back inside ``combine``, so the layer never
changes. Routing policy (capacity, masks) happens before dispatch: an assignment whose expert id is
``E`` (one past the last expert) is not executed and contributes nothing.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from ..experts.bank import ExpertBank


@dataclass
class Assignments:
    """Flat (token, expert, weight) assignments of a batch of ``num_tokens`` tokens.

    ``expert_A == num_experts`` marks an assignment that is not executed (dropped by a capacity limit or
    belonging to a masked token); ``may_skip`` says whether any such entry can occur (a Python flag, so
    the dispatcher knows whether to zero padding rows without a host synchronisation).

    ``top_k`` is set when the assignments are a slot-major grid — assignment ``a = k·T + t`` is token
    t's k-th choice, so ``token_A = a mod T`` — (:meth:`from_grid`); dispatchers then combine by a
    gather and a k-term sum instead of a scatter-add (no atomics, deterministic).
    """
    token_A: Tensor
    expert_A: Tensor
    weight_A: Tensor
    num_tokens: int
    num_experts: int
    may_skip: bool = False
    top_k: int | None = None

    @classmethod
    def from_grid(cls, expert_ids_TK: Tensor, weights_TK: Tensor, num_experts: int,
                  may_skip: bool = False) -> "Assignments":
        """Token-choice assignments from (T, K) expert ids and weights, in slot-major order (all first
        choices, then all second choices, ...: the order capacity serves them in)."""
        T, K = expert_ids_TK.shape
        token_A = torch.arange(T, device=expert_ids_TK.device).repeat(K)
        return cls(token_A, expert_ids_TK.t().reshape(-1), weights_TK.t().reshape(-1), T, num_experts, may_skip, K)


class TokenDispatcher:
    """Base class: see the module docstring for the contract."""

    def dispatch(self, x_TD: Tensor, assignments: Assignments) -> tuple[Tensor, Tensor, Any]:  # pragma: no cover
        raise NotImplementedError

    def compute(self, experts: ExpertBank, rows_RD: Tensor, counts_E: Tensor, state: Any) -> Tensor:
        return experts.forward_weighted(rows_RD, counts_E, state.weight_R, state.valid_R)

    def combine(self, out_RD: Tensor, state: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def __call__(self, x_TD: Tensor, assignments: Assignments, experts: ExpertBank) -> Tensor:
        rows_RD, counts_E, state = self.dispatch(x_TD, assignments)
        return self.combine(self.compute(experts, rows_RD, counts_E, state), state)
