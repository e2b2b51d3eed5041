"""Stratified splits of a labelled set: the one place the train/test and train/validation draws are made.

Legend: T examples (see the package legend).
"""
from __future__ import annotations

import torch
from torch import Tensor


def stratified_split(y_T: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices ``(kept, held_out)`` into the T labels ``y_T``: every class c, in increasing order, holds out
    ``round(fraction · n_c)`` of its examples drawn by a permutation from ``generator``; each index set is
    then shuffled (one more permutation each), so the same generator state gives the same split."""
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction: expected a value in (0, 1), got {fraction}")
    kept, held = [], []
    for c in torch.unique(y_T).tolist():
        idx = torch.nonzero(y_T == c).squeeze(1)
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_held = int(round(fraction * idx.numel()))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    k, h = torch.cat(kept), torch.cat(held)
    return k[torch.randperm(k.numel(), generator=generator)], h[torch.randperm(h.numel(), generator=generator)]


__all__ = ["stratified_split"]
