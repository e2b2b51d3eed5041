"""moekit — Mixture-of-Experts layers, routers, losses and paper reproductions for PyTorch.

Shape-suffix legend, one meaning per letter, package-wide (``x_TD`` is a (T, D) tensor; every file
uses these letters with these meanings and adds none of its own):
  T tokens (or examples) · D model dim / a layer's input features ·
  H hidden units (expert hidden dim; transformers' intermediate_size) · E experts ·
  K experts per token (top-k) · A flat (token, expert) assignments ·
  R rows handed to the experts (grouped by expert) ·
  M rows a process receives from others (expert parallelism) · C capacity (assignments per expert) ·
  G routing groups · N tokens per group · S slots per expert · Z = E·S slots · P expert groups ·
  Q experts per group · W processes (ranks) · B batch · L sequence length · V vocabulary ·
  Y classes (labels) · O output features or output channels · I input channels · U image height ·
  X image width · F tasks · J recorded steps.
Formulas quoted from papers keep their own symbols (Shazeer's H(x) and Load(X), Switch's f_i P_i, a
weight matrix W): they name functions and matrices, not dimensions.
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
