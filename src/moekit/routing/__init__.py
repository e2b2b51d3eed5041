"""Routers: one family per file, all selectable by name in ``MoE(router=...)``.

``build_router(name, dim, num_experts, top_k, **options)`` builds one from the registry ``ROUTERS``.
"""
from __future__ import annotations

import inspect

from torch import nn

from .base import Router
from .plans import ExpertChoicePlan, RoutingPlan, SoftPlan, TokenChoicePlan
from .expert_choice import ExpertChoiceRouter
from .noisy_topk import NoisyTopKRouter
from .scored import ScoredTopKRouter
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
    "scored": ScoredTopKRouter,
}


def router_options(cls: type[Router]) -> list[str]:
    """The keyword options a router class accepts (its own and its bases' keyword-only arguments)."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in (
                    "self", "dim", "num_experts", "top_k"):
                names.add(p.name)
    return sorted(names - set(getattr(cls, "fixed_options", ())))


def build_router(name: str, dim: int, num_experts: int, top_k: int | None = None, **options) -> Router:
    if not isinstance(name, str) or name not in ROUTERS:
        raise ValueError(f"router: unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    cls = ROUTERS[name]
    valid = router_options(cls)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"router_options: unknown option(s) {unknown} for router {name!r}; valid options: {valid}")
    if top_k is None:
        return cls(dim, num_experts, **options)
    return cls(dim, num_experts, top_k, **options)


def router_from_config(config, dim: int, num_experts: int) -> Router:
    """Build the router a :class:`~moekit.config.RouterConfig` describes (registered routers only)."""
    if config.name not in ROUTERS:
        raise ValueError(f"router: {config.name!r} is not a registered router ({sorted(ROUTERS)}); register the "
                         "class in moekit.routing.ROUTERS or pass a Router instance")
    return build_router(config.name, dim, num_experts, config.top_k, **config.options)


__all__ = ["router_options", "ROUTERS", "Router", "RoutingPlan", "TokenChoicePlan", "ExpertChoicePlan", "SoftPlan",
           "build_router", "router_from_config", "SoftmaxRouter", "NoisyTopKRouter",
           "TopKRouter", "VMoERouter", "SwitchRouter", "ExpertChoiceRouter", "SoftRouter", "SigmoidRouter",
           "ScoredTopKRouter"]
