"""All-to-all token dispatcher for expert parallelism on torch.distributed.

Legend: T tokens (this rank), D model dim, E experts (global), P expert-parallel ranks,
El = E/P experts per rank, R rows this rank sends, Q rows this rank receives.

Rank p owns experts ``[p·El, (p+1)·El)``. ``dispatch``: sort this rank's assignments by global expert
(dropped ones — id E — go last and are not sent), exchange the per-expert counts (one small
all-to-all; the split sizes are then read on the host, as every variable-size all-to-all must), send
the rows to their owners with a differentiable all-to-all, and regroup the received rows by local
expert. ``combine`` reverses both steps and scatter-adds the weighted outputs into the tokens.
Gradients flow back through the same collectives, so each rank's experts receive the gradient from
every rank's tokens.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor
from torch.distributed._functional_collectives import all_to_all_single_autograd

from ..dispatch import Assignments, TokenDispatcher, expert_counts


@dataclass
class AllToAllState:
    token_R: Tensor          # (R,) the token each sent row came from
    weight_R: Tensor         # (R,) its combine weight
    perm_Q: Tensor           # (Q,) received rows (source-major) -> rows grouped by local expert
    send_splits: list[int]   # rows sent to each rank
    recv_splits: list[int]   # rows received from each rank
    num_tokens: int


def _wait(t: Tensor) -> Tensor:
    """Materialise a functional-collective result (an AsyncCollectiveTensor) as a plain tensor."""
    return t.wait() if hasattr(t, "wait") else t


class AllToAllDispatcher(TokenDispatcher):
    """Dispatcher for a layer whose E experts are spread over the ranks of ``group`` (E/P each)."""

    def __init__(self, group, num_experts: int):
        self.group = group
        self.size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        if num_experts % self.size:
            raise ValueError(f"num_experts: {num_experts} experts do not split over an expert-parallel size of "
                             f"{self.size}; num_experts must be divisible by it")
        self.num_experts = num_experts
        self.num_local = num_experts // self.size

    def dispatch(self, x_TD: Tensor, a: Assignments):
        P, El = self.size, self.num_local
        order_A = torch.argsort(a.expert_A, stable=True)               # by global expert; dropped last
        counts_PE = expert_counts(a.expert_A, a.num_experts).view(P, El)
        recv_PE = torch.empty_like(counts_PE)
        dist.all_to_all_single(recv_PE.view(-1), counts_PE.reshape(-1).contiguous(), group=self.group)
        send_splits = counts_PE.sum(1).tolist()                         # host read: all-to-all split sizes
        recv_splits = recv_PE.sum(1).tolist()
        R = sum(send_splits)
        token_R = a.token_A[order_A[:R]]
        weight_R = a.weight_A[order_A[:R]]
        rows_RD = x_TD.index_select(0, token_R)
        recv_QD = _wait(all_to_all_single_autograd(rows_RD.contiguous(), recv_splits, send_splits, self.group))
        # received rows are source-major, each source's block sorted by local expert: regroup by expert
        local_Q = torch.repeat_interleave(torch.arange(El, device=x_TD.device).repeat(P), recv_PE.reshape(-1),
                                          output_size=sum(recv_splits))
        perm_Q = torch.argsort(local_Q, stable=True)
        rows_QD = recv_QD.index_select(0, perm_Q)
        state = AllToAllState(token_R, weight_R, perm_Q, send_splits, recv_splits, a.num_tokens)
        return rows_QD, recv_PE.sum(0), state

    def combine(self, out_QD: Tensor, state: AllToAllState) -> Tensor:
        back_QD = torch.zeros_like(out_QD).index_copy(0, state.perm_Q, out_QD)   # undo the regrouping
        out_RD = _wait(all_to_all_single_autograd(back_QD.contiguous(), state.send_splits, state.recv_splits,
                                                  self.group))
        out_RD = out_RD * state.weight_R[:, None].to(out_RD.dtype)
        y_TD = out_RD.new_zeros(state.num_tokens, out_RD.shape[-1])
        return y_TD.index_add(0, state.token_R, out_RD)
