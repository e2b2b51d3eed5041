"""moekit — Mixture-of-Experts layers, routers, losses and paper reproductions for PyTorch.

Shape-suffix legend used across the package (``x_TD`` is a (T, D) tensor; files add their own letters):
  T tokens · D model dim · H expert hidden dim · E experts · K experts per token (top-k) ·
  A flat (token, expert) assignments · R rows handed to the experts (grouped by expert) ·
  C capacity (slots per expert) · G routing groups · N tokens per group · S slots per expert ·
  Z = E·S slots · B batch · L sequence length or classes · V vocabulary.
"""
from . import checkpoint, dispatch, experts, losses, routing, stats
from .layers.moe import MoE
from .routing import ROUTERS, Router, RoutingDecision, build_router
from .stats import RoutingStats
from .types import MoEOutput

__version__ = "0.1.0"

__all__ = ["MoE", "MoEOutput", "ROUTERS", "Router", "RoutingDecision", "RoutingStats", "build_router", "checkpoint", "dispatch",
           "experts", "losses", "routing", "stats", "__version__"]


def __getattr__(name: str):
    """``moekit.analysis`` and ``moekit.hf`` (optional extras) load on first use."""
    if name in ("analysis", "hf"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
