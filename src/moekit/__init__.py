"""moekit — Mixture-of-Experts layers, routers, losses and paper reproductions for PyTorch."""
from . import dispatch, experts, losses, routing
from .layers.moe import MoE
from .routing import ROUTERS, Router, RoutingDecision, build_router
from .types import MoEOutput

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "ROUTERS", "Router", "RoutingDecision", "build_router", "dispatch", "experts",
           "losses", "routing", "__version__"]
