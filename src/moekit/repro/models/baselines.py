"""The plain networks the classic mixture-of-experts papers compare against.

* :class:`BackpropNet` — Jacobs, Jordan, Nowlan & Hinton 1991: one tanh hidden layer, linear outputs.
* :class:`SingleNet` — Bishop, PRML §5.6 / §14.5: a least-squares network for a 1-D regression, which
  predicts the conditional mean.

Legend: T examples, D input dim (see the package legend). The ``forward`` arguments keep their historical
names: ``x_ND`` is (T, D), ``x_N1`` is (T, 1).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def reset_linears(linears: tuple[nn.Linear, ...], generator: torch.Generator | None = None) -> None:
    """Re-draw each layer's weight, then bias, from ``nn.Linear``'s default U(±1/√in_features), in order, from
    ``generator`` (a seeded model without touching the global RNG)."""
    for lin in linears:
        bound = 1.0 / math.sqrt(lin.in_features)
        nn.init.uniform_(lin.weight, -bound, bound, generator=generator)
        nn.init.uniform_(lin.bias, -bound, bound, generator=generator)


class BackpropNet(nn.Module):
    """The paper's baseline: one tanh hidden layer, linear outputs, ``y = W2 tanh(W1 x + b1) + b2``."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.hidden = nn.Linear(in_dim, hidden)
        self.out = nn.Linear(hidden, out_dim)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_linears((self.hidden, self.out), generator)

    def forward(self, x_ND: Tensor) -> Tensor:
        return self.out(torch.tanh(self.hidden(x_ND)))


class SingleNet(nn.Module):
    """``1 → hidden tanh → 1``; squared-error training makes it the conditional mean E[t | x]."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, hidden), nn.Tanh(), nn.Linear(hidden, 1))
        self.register_buffer("log_var", torch.zeros(()))   # set after training: log of the residual variance

    def forward(self, x_N1: Tensor) -> Tensor:
        return self.net(x_N1)


__all__ = ["BackpropNet", "SingleNet", "reset_linears"]
