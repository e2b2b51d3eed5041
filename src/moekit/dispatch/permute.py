"""Row permutations with gather-only backward passes: the atomics-free pieces of token dispatch.

Legend: T tokens, D model dim, K experts per token, A = K·T assignments (slot-major: ``a = k·T + t``),
R rows handed to the experts (the A assignments grouped by expert).

Grouping assignments by expert is a permutation ``order_R`` of the A assignment rows. Its inverse
``inverse_A`` (row of each assignment) turns every backward pass into a gather:

* :func:`permute_rows` ``(v, index, inverse)`` — ``v[index]`` whose backward is ``g[inverse]``
  (torch's ``index_select`` backward would scatter-add with atomics);
* :func:`gather_tokens` — the dispatch gather ``x_TD[order_R mod T]`` of a slot-major grid; its
  backward gathers the A row gradients back into (K, T, D) by ``inverse_A`` and sums the K slots.

The combine of a grid is then ``permute_rows(out_RD, inverse_A, order_R).view(K, T, D).sum(0)``: a
gather and a k-term sum. Nothing here adds into memory concurrently, so the results are bitwise
reproducible; nothing reads a value on the host.
"""
from __future__ import annotations

import torch
from torch import Tensor


def invert_permutation(order_R: Tensor) -> Tensor:
    """``inverse[order[r]] = r`` (a scatter with unique indices: no accumulation)."""
    return torch.empty_like(order_R).scatter_(0, order_R, torch.arange(order_R.numel(), device=order_R.device))


def counts_from_sorted(sorted_ids_R: Tensor, num_bins: int) -> Tensor:
    """How many entries of an ascending id vector fall in each of ``num_bins`` bins (ids ≥ num_bins
    are ignored), by binary search: no atomics, no host read."""
    bounds = torch.searchsorted(sorted_ids_R, torch.arange(num_bins + 1, device=sorted_ids_R.device,
                                                           dtype=sorted_ids_R.dtype))
    return bounds[1:] - bounds[:-1]


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v: Tensor, index: Tensor, inverse: Tensor) -> Tensor:
        ctx.save_for_backward(inverse)
        return v.index_select(0, index)

    @staticmethod
    def backward(ctx, g: Tensor):
        (inverse,) = ctx.saved_tensors
        return permute_rows(g, inverse, None), None, None


def permute_rows(v: Tensor, index: Tensor, inverse: Tensor | None) -> Tensor:
    """``v[index]`` for a permutation ``index`` with inverse ``inverse``; the backward gathers by
    ``inverse`` (when ``inverse`` is None — inside a backward — a plain, differentiable ``index_select``)."""
    if inverse is None:
        return v.index_select(0, index)
    return _PermuteRows.apply(v, index, inverse)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, token_R: Tensor, inverse_A: Tensor, top_k: int) -> Tensor:
        ctx.save_for_backward(inverse_A)
        ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
        return x_TD.index_select(0, token_R)

    @staticmethod
    def backward(ctx, g_RD: Tensor):
        (inverse_A,) = ctx.saved_tensors
        T = ctx.num_tokens
        g_AD = g_RD.index_select(0, inverse_A)            # row gradient of every assignment, slot-major
        return g_AD.view(ctx.top_k, T, g_AD.shape[-1]).sum(0), None, None, None


def gather_tokens(x_TD: Tensor, order_R: Tensor, inverse_A: Tensor, top_k: int) -> Tensor:
    """Rows ``x_TD[order_R mod T]`` of a slot-major (K, T) grid of assignments (see the module docstring)."""
    T = x_TD.shape[0]
    return _GatherTokens.apply(x_TD, torch.remainder(order_R, torch.sym_max(T, 1)), inverse_A, top_k)


def combine_grid(out_RD: Tensor, order_R: Tensor, inverse_A: Tensor, num_tokens: int, top_k: int) -> Tensor:
    """``y_t = Σ_k out[row of assignment k·T + t]``: a gather into (K, T, D) and a k-term sum."""
    out_AD = permute_rows(out_RD, inverse_A, order_R)
    return out_AD.view(top_k, num_tokens, out_AD.shape[-1]).sum(0)
