"""Navigation policies of the situational-fusion reproduction (views + target category → action
probabilities): a plain MLP over some views and :class:`moekit.layers.fusion.SituationalFusion` over all.

Every policy returns ``(probs (B, A), aux_loss, fusion weights (B, V) or None)``.
Legend: B batch, A actions, V views, F/H feature/hidden widths.
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
    """One policy over the views ``use`` (concatenated) and the target: ``F → H → A`` (ReLU), softmax."""

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


__all__ = ["FusionPolicy", "GOAL_DIM", "MLPPolicy"]
