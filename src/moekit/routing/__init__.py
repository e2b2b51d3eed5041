"""Routers: one family per file, all selectable by name in ``MoE(router=...)``.

``build_router(name, dim, num_experts, top_k, **options)`` builds one from the registry ``ROUTERS``.
"""
from __future__ import annotations

from .base import Router, RoutingDecision
from .expert_choice import ExpertChoiceRouter
from .noisy_topk import NoisyTopKRouter
from .sigmoid import SigmoidRouter
from .soft import SoftRouter
from .softmax import SoftmaxRouter
from .topk import SwitchRouter, TopKRouter, VMoERouter

ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "noisy_topk": NoisyTopKRouter,
    "topk": TopKRouter,
    "vmoe": VMoERouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "soft": SoftRouter,
    "sigmoid": SigmoidRouter,
}


def build_router(name: str, dim: int, num_experts: int, top_k: int | None = None, **options) -> Router:
    if not isinstance(name, str) or name not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    cls = ROUTERS[name]
    if top_k is None:
        return cls(dim, num_experts, **options)
    return cls(dim, num_experts, top_k, **options)


__all__ = ["ROUTERS", "Router", "RoutingDecision", "build_router", "SoftmaxRouter", "NoisyTopKRouter",
           "TopKRouter", "VMoERouter", "SwitchRouter", "ExpertChoiceRouter", "SoftRouter", "SigmoidRouter"]
