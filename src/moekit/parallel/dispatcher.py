"""All-to-all token dispatcher for expert parallelism on torch.distributed.

Legend (the package's): T tokens (this rank), D model dim, E experts (global), W expert-parallel
ranks (each holding E/W local experts), A assignments, R rows this rank sends, M rows it receives.

Rank p owns experts ``[p·E/W, (p+1)·E/W)``. ``dispatch``: sort this rank's assignments by global expert
(dropped ones — id E — go last and are not sent), exchange the per-expert counts (one small
all-to-all; the split sizes are then read on the host, as every variable-size all-to-all must), send
the rows to their owners with a differentiable all-to-all, and regroup the received rows by local
expert (the combine weights travel with the rows: the receiving bank applies them, on its output or,
for input-gated banks, on its input). ``combine`` reverses both steps and, for token-choice grids,
gathers the weighted outputs back into the tokens through the inverse permutation (no atomics).
Gradients flow back through the same collectives, so each rank's experts receive the gradient from
every rank's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..dispatch import (Assignments, TokenDispatcher, combine_grid, counts_from_sorted, gather_tokens,
                        invert_permutation, permute_rows)


@dataclass
class AllToAllState:
    order_A: Tensor          # (A,) assignments sorted by global expert (not executed ones last)
    inverse_A: Tensor        # (A,) the sorted position of each assignment
    token_R: Tensor | None   # (R,) the token of each sent row (assignments that are not a grid)
    weight_R: Tensor         # (M,) the combine weight of each received row, grouped by local expert
    valid_R: None            # every received row is executed
    perm_M: Tensor           # (M,) received rows (source-major) -> rows grouped by local expert
    inv_M: Tensor            # (M,) its inverse
    send_splits: list[int]   # rows sent to each rank
    recv_splits: list[int]   # rows received from each rank
    num_tokens: int
    top_k: int | None


def _wait(t: Tensor) -> Tensor:
    """Materialise a functional-collective result (an AsyncCollectiveTensor) as a plain tensor."""
    return t.wait() if hasattr(t, "wait") else t


class AllToAllDispatcher(TokenDispatcher):
    """Dispatcher for a layer whose E experts are spread over the ranks of ``group`` (E/W each).
    ``mesh``: the device mesh the layer was placed on (:func:`~moekit.parallel.expert_parallel` sets
    it; :func:`~moekit.parallel.parallel_mesh` reads it)."""

    def __init__(self, group, num_experts: int, mesh=None):
        self.group = group
        self.mesh = mesh
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"num_experts: {num_experts} experts do not split over an expert-parallel size of "
                             f"{self.size}; num_experts must be divisible by it")
        self.num_experts = num_experts
        self.num_local = num_experts // self.size

    def _exchange(self, v_R: Tensor, recv: list[int], send: list[int]) -> Tensor:
        return _wait(all_to_all_single_autograd(v_R.contiguous(), recv, send, self.group))

    def dispatch(self, x_TD: Tensor, a: Assignments):
        W, num_local = self.size, self.num_local
        order_A = torch.argsort(a.expert_A, stable=True)               # by global expert; dropped last
        inverse_A = invert_permutation(order_A)
        counts_WE = counts_from_sorted(a.expert_A.index_select(0, order_A), a.num_experts).view(W, num_local)
        recv_WE = torch.empty_like(counts_WE)
        dist.all_to_all_single(recv_WE.view(-1), counts_WE.reshape(-1).contiguous(), group=self.group)
        send_splits = counts_WE.sum(1).tolist()                         # host read: all-to-all split sizes
        recv_splits = recv_WE.sum(1).tolist()
        R, M = sum(send_splits), sum(recv_splits)
        token_R = None
        if a.top_k is not None:                                         # a grid: gather-only backward
            rows_RD = gather_tokens(x_TD, order_A, inverse_A, a.top_k)[:R]
        else:
            token_R = a.token_A.index_select(0, order_A[:R])
            rows_RD = x_TD.index_select(0, token_R)
        weight_R = permute_rows(a.weight_A, order_A, inverse_A)[:R]
        recv_MD = self._exchange(rows_RD, recv_splits, send_splits)
        recv_M = self._exchange(weight_R[:, None], recv_splits, send_splits)[:, 0]   # weights travel with rows
        # received rows are source-major, each source's block sorted by local expert: regroup by expert
        local_M = torch.repeat_interleave(torch.arange(num_local, device=x_TD.device).repeat(W), recv_WE.reshape(-1),
                                          output_size=M)
        perm_M = torch.argsort(local_M, stable=True)
        inv_M = invert_permutation(perm_M)
        state = AllToAllState(order_A, inverse_A, token_R, permute_rows(recv_M, perm_M, inv_M), None, perm_M, inv_M,
                              send_splits, recv_splits, a.num_tokens, a.top_k)
        return permute_rows(recv_MD, perm_M, inv_M), recv_WE.sum(0), state

    def combine(self, out_MD: Tensor, state: AllToAllState) -> Tensor:
        back_MD = permute_rows(out_MD, state.inv_M, state.perm_M)           # undo the regrouping
        out_RD = self._exchange(back_MD, state.send_splits, state.recv_splits)   # weighted rows, back home
        if state.top_k is not None:                  # rows not sent (not executed) contribute zeros
            A = state.order_A.shape[0]
            out_AD = torch.cat([out_RD, out_RD.new_zeros(A - out_RD.shape[0], out_RD.shape[-1])])
            return combine_grid(out_AD, state.order_A, state.inverse_A, state.num_tokens, state.top_k)
        y_TD = out_RD.new_zeros(state.num_tokens, out_RD.shape[-1])
        return y_TD.index_add(0, state.token_R, out_RD)
