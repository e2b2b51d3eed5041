"""Multi-gate Mixture-of-Experts for multi-task learning (Ma et al., KDD 2018).

Legend (the package's, ``moekit/__init__.py``): T tokens (examples), D input features, H expert hidden dim,
E experts, F tasks.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..experts import build_experts
from ..types import MoEOutput


class MultiGateMoE(nn.Module):
    """E shared experts, one softmax gate per task: ``f_m(x) = Σ_i softmax(x W_m)_i · expert_i(x)`` (task m).

    Every expert runs on every example (MMoE is dense); the experts are a stacked bank run as one
    batched matmul. ``forward(x (..., D)) -> MoEOutput(y, aux_loss, metrics)`` with ``y`` of shape
    ``(F, ..., D)`` — one representation per task, fed to that task's tower. ``aux_loss`` is zero
    (MMoE has no balancing loss); metrics report each task's mean gate over experts and its entropy.
    With ``num_tasks=1`` this is the one-gate MoE baseline of the paper (OMoE).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, num_tasks: int, *, expert: str = "mlp",
                 activation: str = "relu"):
        super().__init__()
        V.positive_int("num_tasks", num_tasks)
        self.dim, self.num_experts, self.num_tasks = dim, num_experts, num_tasks
        self.experts = build_experts(expert, num_experts, dim, hidden_dim, activation=activation)
        self.gates = nn.Parameter(torch.randn(num_tasks, dim, num_experts) * dim ** -0.5)   # one gate per task

    def forward(self, x: Tensor) -> MoEOutput:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError("x: expected a floating-point torch.Tensor")
        if x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        x_TD = x.reshape(-1, self.dim)
        y_ETD = self.experts.forward_dense(x_TD)                               # every expert, every example
        gates_FTE = torch.softmax(torch.einsum("td,fde->fte", x_TD.float(), self.gates.float()), dim=-1)
        y_FTD = torch.einsum("fte,etd->ftd", gates_FTE.to(y_ETD.dtype), y_ETD)
        g = gates_FTE.detach()
        metrics = {
            "gate_mean": g.mean(1),                                            # (F, E)
            "gate_entropy": -(g * g.clamp_min(1e-20).log()).sum(-1).mean(-1),   # (F,)
        }
        aux = torch.zeros((), device=x.device)
        return MoEOutput(y_FTD.reshape(self.num_tasks, *x.shape), aux, metrics)
