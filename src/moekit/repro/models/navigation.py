"""Navigation policies of the situational-fusion reproduction (views + target category → action
probabilities): a plain MLP over some views, :class:`moekit.layers.fusion.SituationalFusion` over all
(heads and gate trained jointly, the gate reading every view), and the paper's own form of the method:
:class:`FrozenExpertFusion` (independently trained single-view policies, frozen, mixed by a gate that reads a
separate gate input) with :class:`GatedFeatureFusion`, its feature-level counterpart with the same gate.

Every policy returns ``(probs (B, Y), aux_loss, fusion weights (B, views) or None)``. The two gated models take
``gate_views``: the observation the gate reads (default: the views themselves). The paper computes the
mixing weights from the RGB image, which a failing representation does not change; the experiment passes the
intact views there while the experts read the changed ones.
Legend: B batch, Y actions (the 9 action classes), D a view's input features, H hidden units; the number of
views is written out (see the package legend).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from moekit.layers.fusion import SituationalFusion
from moekit.repro.envs.gridnav import CATEGORIES, NUM_ACTIONS


GOAL_DIM = len(CATEGORIES) + 2  # target one-hot + noisy compass (cos, sin): NavWorld.goal


def _with_goal(views: list[Tensor], goal_B: Tensor) -> list[Tensor]:
    return [torch.cat([v, goal_B], dim=-1) for v in views]


class MLPPolicy(nn.Module):
    """One policy over the views ``use`` (concatenated) and the target: ``D → H → Y`` (ReLU), softmax."""

    def __init__(self, view_dims: list[int], use: list[int], hidden: int):
        super().__init__()
        self.use = list(use)
        in_dim = sum(view_dims[i] + GOAL_DIM for i in self.use)
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, NUM_ACTIONS))

    def forward(self, views: list[Tensor], goal_B: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        x = torch.cat(_with_goal([views[i] for i in self.use], goal_B), dim=-1)
        return torch.softmax(self.net(x), -1), torch.zeros(()), None


class FusionPolicy(nn.Module):
    """:class:`SituationalFusion` over all views (each with the target appended)."""

    def __init__(self, view_dims: list[int], hidden: int, level: str, affinity: Tensor | None = None,
                 beta: float = 0.0, penalty_form: str = "quadratic"):
        super().__init__()
        self.fusion = SituationalFusion([d + GOAL_DIM for d in view_dims], NUM_ACTIONS, level=level,
                                        hidden_dim=hidden, affinity=affinity, beta=beta, penalty_form=penalty_form)

    def forward(self, views: list[Tensor], goal_B: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:
        feats = _with_goal(views, goal_B)
        out = self.fusion(feats)
        return out.y, out.aux_loss, self.fusion.fusion_weights(feats)


class _Gate(nn.Module):
    """Softmax weights over ``n`` experts from the gate views and the goal: ``ΣD → H → n`` (ReLU)."""

    def __init__(self, view_dims: list[int], n: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(sum(view_dims) + GOAL_DIM, hidden), nn.ReLU(), nn.Linear(hidden, n))

    def forward(self, gate_views: list[Tensor], goal_B: Tensor) -> Tensor:
        return torch.softmax(self.net(torch.cat([*gate_views, goal_B], dim=-1)), -1)


class FrozenExpertFusion(nn.Module):
    """Action-level fusion of independently trained policies: ``π(a) = Σ_i w_i(gate views) π_i(a | view_i)``.
    The experts are frozen (no gradient reaches them); only the gate trains."""

    def __init__(self, experts: list[nn.Module], view_dims: list[int], hidden: int):
        super().__init__()
        self.experts = nn.ModuleList(experts)
        for p in self.experts.parameters():
            p.requires_grad_(False)
        self.gate = _Gate(view_dims, len(experts), hidden)

    def forward(self, views: list[Tensor], goal_B: Tensor, gate_views: list[Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        w_view = self.gate(views if gate_views is None else gate_views, goal_B)
        with torch.no_grad():
            probs_view = torch.stack([e(views, goal_B)[0] for e in self.experts], dim=1)
        return torch.einsum("bv,bvy->by", w_view, probs_view), torch.zeros(()), w_view


class GatedFeatureFusion(nn.Module):
    """Feature-level fusion with the same gate as :class:`FrozenExpertFusion`: per-view projections
    ``z_i = ReLU(P_i [view_i, goal])``, ``π = softmax(head(Σ_i w_i(gate views) z_i))``; trained end to end."""

    def __init__(self, view_dims: list[int], hidden: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(d + GOAL_DIM, hidden) for d in view_dims)
        self.head = nn.Linear(hidden, NUM_ACTIONS)
        self.gate = _Gate(view_dims, len(view_dims), hidden)

    def forward(self, views: list[Tensor], goal_B: Tensor, gate_views: list[Tensor] | None = None
                ) -> tuple[Tensor, Tensor, Tensor]:
        w_view = self.gate(views if gate_views is None else gate_views, goal_B)
        z_view = torch.stack([torch.relu(p(f)) for p, f in zip(self.projections, _with_goal(views, goal_B))], dim=1)
        return torch.softmax(self.head(torch.einsum("bv,bvh->bh", w_view, z_view)), -1), torch.zeros(()), w_view


__all__ = ["FrozenExpertFusion", "FusionPolicy", "GOAL_DIM", "GatedFeatureFusion", "MLPPolicy"]
