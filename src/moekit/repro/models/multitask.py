"""Multi-task models of Ma et al. 2018 (MMoE), built on :class:`moekit.layers.multitask.MultiGateMoE`.

Legend: T examples, D input dim, F tasks (one gate per task with ``gates=2``); see the package legend.
``forward``'s argument keeps its historical name ``x_ND``: a (T, D) batch.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.layers.multitask import MultiGateMoE


class MultiTaskRegressor(nn.Module):
    """A multi-task bottom (:class:`MultiGateMoE`) and one ``D → tower_hidden ReLU → 1`` tower per task.

    ``gates=2``: MMoE; ``gates=1``: OMoE (both towers read the one mixture); ``experts=1, gates=1``:
    shared-bottom. ``forward(x (T, D)) -> (T, 2)``, one prediction per task."""

    def __init__(self, dim: int, hidden: int, experts: int, gates: int, tower_hidden: int, tasks: int = 2):
        super().__init__()
        self.bottom = MultiGateMoE(dim, hidden, experts, num_tasks=gates, expert="mlp", activation="relu")
        self.towers = nn.ModuleList(nn.Sequential(nn.Linear(dim, tower_hidden), nn.ReLU(),
                                                  nn.Linear(tower_hidden, 1)) for _ in range(tasks))

    def forward(self, x_ND: Tensor) -> Tensor:
        y_FTD = self.bottom(x_ND).y                       # aux_loss is zero: MMoE has no balancing loss
        num_gates = y_FTD.shape[0]
        return torch.cat([tower(y_FTD[min(m, num_gates - 1)]) for m, tower in enumerate(self.towers)], -1)


__all__ = ["MultiTaskRegressor"]
