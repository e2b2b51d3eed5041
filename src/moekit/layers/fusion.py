"""Situational fusion of representation experts (Shen et al., ICCV 2019).

Legend (the package's letters): B examples, E representations (the experts), D_i the feature dim of
representation i, H hidden units, Y actions (the policy's classes).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor, nn

from ..types import MoEOutput


PENALTY_FORMS = ("quadratic", "pairwise", "mean")


def affinity_penalty(mean_weights_E: Tensor, affinity_EE: Tensor, form: str = "quadratic") -> Tensor:
    """Inter-task affinity regulariser on the batch-mean fusion weights ``w̄``.

    ``"pairwise"``: ``Σ_{i≠j} w̄_i w̄_j A_ij`` — weight on two mutually redundant representations at once
    is penalised. ``"mean"``: ``Σ_i w̄_i · mean_{j≠i} A_ij`` — weight on a representation that is redundant
    with the others is penalised. ``"quadratic"``: ``w̄ᵀ A w̄ = Σ_i w̄_i² A_ii + Σ_{i≠j} w̄_i w̄_j A_ij`` — the
    pairwise form plus the diagonal, so with ``A = I`` it is smallest at uniform weights: it asks for a
    balanced selection across groups of redundant representations (the pairwise form alone is zero when all
    weight sits on one representation). (The paper's exact form is not pinned down; all three are offered.)

    ``"quadratic"`` is the default. ``"pairwise"`` was the default before; it is zero, with a zero gradient,
    whenever all weight sits on one representation, so it cannot pull a fusion that has collapsed onto one view
    back out (in the situational-fusion experiment: 10.2 % success with it against 32.9 % with
    ``"quadratic"``). It stays selectable by name for anyone who needs the earlier numbers.
    """
    E = mean_weights_E.shape[0]
    if affinity_EE.shape != (E, E):
        raise ValueError(f"affinity: expected shape ({E}, {E}), got {tuple(affinity_EE.shape)}")
    off_EE = affinity_EE * (1 - torch.eye(E, device=affinity_EE.device, dtype=affinity_EE.dtype))
    if form == "pairwise":
        return mean_weights_E @ off_EE @ mean_weights_E
    if form == "mean":
        return (mean_weights_E * off_EE.sum(1) / max(E - 1, 1)).sum()
    if form == "quadratic":
        return mean_weights_E @ affinity_EE @ mean_weights_E
    raise ValueError(f"form: expected one of {', '.join(repr(f) for f in PENALTY_FORMS)}, got {form!r}")


class SituationalFusion(nn.Module):
    """Mixture of policies over E frozen representations: ``π(a|o) = Σ_i w_i(o) π_i(a|o)`` with
    ``w(o) = softmax(f(o))`` (action-level fusion), or one head on ``Σ_i w_i(o) P_i φ_i(o)``
    (feature-level fusion, the baseline). ``f`` is a small MLP on the concatenated representations.

    ``forward(features: list of (B, D_i)) -> MoEOutput(y = action probabilities (B, Y), aux_loss =
    β · affinity penalty, metrics)``.

    ``penalty_form`` picks the affinity penalty (see :func:`affinity_penalty`); it defaults to ``"quadratic"``,
    ``w̄ᵀ A w̄``, which is smallest at a balanced weighting and grows as the weights collapse onto one view.
    The earlier default ``"pairwise"`` (off-diagonal terms only) is zero on a collapsed weighting and let
    training collapse; pass ``penalty_form="pairwise"`` explicitly to reproduce results made with it.
    """

    def __init__(self, feature_dims: Sequence[int], num_actions: int, *, level: str = "action",
                 hidden_dim: int = 64, affinity: Tensor | None = None, beta: float = 0.0,
                 penalty_form: str = "quadratic"):
        super().__init__()
        if len(feature_dims) < 1 or any(int(f) < 1 for f in feature_dims):
            raise ValueError(f"feature_dims: expected positive ints, got {list(feature_dims)!r}")
        if level not in ("action", "feature"):
            raise ValueError(f"level: expected 'action' or 'feature', got {level!r}")
        if beta < 0:
            raise ValueError(f"beta: must be >= 0, got {beta!r}")
        if penalty_form not in PENALTY_FORMS:
            raise ValueError(f"penalty_form: expected one of {', '.join(repr(f) for f in PENALTY_FORMS)}, "
                             f"got {penalty_form!r}")
        E = len(feature_dims)
        self.level, self.beta, self.penalty_form = level, float(beta), penalty_form
        self.feature_dims = [int(f) for f in feature_dims]
        self.fusion = nn.Sequential(nn.Linear(sum(self.feature_dims), hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, E))
        if level == "action":
            self.heads = nn.ModuleList(nn.Sequential(nn.Linear(f, hidden_dim), nn.ReLU(), nn.Linear(hidden_dim, num_actions))
                                       for f in self.feature_dims)
        else:
            self.projections = nn.ModuleList(nn.Linear(f, hidden_dim) for f in self.feature_dims)
            self.head = nn.Sequential(nn.ReLU(), nn.Linear(hidden_dim, num_actions))
        if affinity is not None:
            affinity = torch.as_tensor(affinity, dtype=torch.float32)
            if affinity.shape != (E, E):
                raise ValueError(f"affinity: expected shape ({E}, {E}), got {tuple(affinity.shape)}")
        self.register_buffer("affinity", affinity)

    def fusion_weights(self, features: Sequence[Tensor]) -> Tensor:
        """Per-example fusion weights ``w(o)`` (B, E), rows summing to 1 (for analysing the situations)."""
        if len(features) != len(self.feature_dims):
            raise ValueError(f"features: expected {len(self.feature_dims)} representations, got {len(features)}")
        for i, (f, d) in enumerate(zip(features, self.feature_dims)):
            if f.shape[-1] != d:
                raise ValueError(f"features[{i}]: last dimension must be {d}, got {tuple(f.shape)}")
        return torch.softmax(self.fusion(torch.cat(list(features), dim=-1)), dim=-1)

    def forward(self, features: Sequence[Tensor]) -> MoEOutput:
        w_BE = self.fusion_weights(features)
        if self.level == "action":
            probs_BEY = torch.stack([torch.softmax(h(f), -1) for h, f in zip(self.heads, features)], dim=1)
            y_BY = torch.einsum("be,bey->by", w_BE, probs_BEY)
        else:
            z_BEH = torch.stack([p(f) for p, f in zip(self.projections, features)], dim=1)
            y_BY = torch.softmax(self.head(torch.einsum("be,beh->bh", w_BE, z_BEH)), dim=-1)
        w_mean_E = w_BE.mean(0)
        aux = torch.zeros((), device=w_BE.device)
        metrics = {"fusion_weights": w_mean_E.detach()}
        if self.affinity is not None:
            penalty = affinity_penalty(w_mean_E, self.affinity, self.penalty_form)
            metrics["affinity_penalty"] = penalty.detach()
            if self.beta > 0:
                aux = aux + self.beta * penalty
        return MoEOutput(y_BY, aux, metrics)
