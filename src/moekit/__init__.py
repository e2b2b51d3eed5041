"""moekit — Mixture-of-Experts layers, routers, losses and paper reproductions for PyTorch.

Shape-suffix legend, one meaning per letter, package-wide (``x_TD`` is a (T, D) tensor; files use
these letters and no others of their own):
  T tokens · D model dim · H expert hidden dim · E experts · K experts per token (top-k) ·
  A flat (token, expert) assignments · R rows handed to the experts (grouped by expert) ·
  C capacity (assignments per expert) · G routing groups · N tokens per group · S slots per expert ·
  Z = E·S slots · P expert groups · Q experts per group · B batch · L sequence length ·
  V vocabulary · Y classes.
"""
from . import checkpoint, config, dispatch, experts, losses, routing, stats
from .config import MoEConfig
from .layers.moe import MoE
from .routing import ROUTERS, Router, RoutingPlan, build_router
from .stats import RoutingStats
from .types import MoEOutput

__version__ = "0.1.0"

__all__ = ["MoE", "MoEConfig", "MoEOutput", "ROUTERS", "Router", "RoutingPlan", "config", "RoutingStats", "build_router", "checkpoint", "dispatch",
           "experts", "losses", "routing", "stats", "__version__"]


def __getattr__(name: str):
    """``moekit.analysis`` and ``moekit.hf`` (optional extras) load on first use."""
    if name in ("analysis", "hf"):
        import importlib
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'moekit' has no attribute {name!r}")
