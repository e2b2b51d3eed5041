"""Output convention shared by every routed layer in moekit.

A routed layer returns ``MoEOutput(y, aux_loss, metrics)``:
  * ``y``        – the layer output, same leading shape as the input;
  * ``aux_loss`` – a *weighted* scalar tensor (``zeros(())`` when no loss applies, never None);
  * ``metrics``  – a flat ``dict[str, Tensor]`` of detached values for logging: unweighted losses
    and per-expert statistics;
  * ``stats``    – for routed layers built on the core router, the differentiable
    :class:`~moekit.stats.RoutingStats` the aux loss was formed from (None elsewhere): add them over
    micro-batches and form one loss with ``router.balance_losses(total)``.
The training step is the one place where ``task_loss + aux_loss`` is formed.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor


class MoEOutput(NamedTuple):
    y: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]
    stats: Any = None          # moekit.stats.RoutingStats for routed layers


def zero_loss(ref: Tensor) -> Tensor:
    """A scalar zero on ``ref``'s device, float32 (or ``ref``'s dtype if it is float64)."""
    dtype = torch.float64 if ref.dtype == torch.float64 else torch.float32
    return torch.zeros((), device=ref.device, dtype=dtype)


def detach_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: (v.detach() if isinstance(v, Tensor) else torch.as_tensor(v)) for k, v in metrics.items()}


def merge_outputs(outputs: list[MoEOutput], prefix: str = "layer") -> tuple[Tensor, dict[str, Tensor]]:
    """Sum the aux losses of several routed layers and namespace their metrics ``{prefix}{i}/{name}``."""
    if not outputs:
        raise ValueError("outputs: expected at least one MoEOutput")
    aux = sum((o.aux_loss for o in outputs[1:]), outputs[0].aux_loss)
    metrics: dict[str, Tensor] = {}
    for i, o in enumerate(outputs):
        for k, v in o.metrics.items():
            metrics[f"{prefix}{i}/{k}"] = v
    return aux, metrics
