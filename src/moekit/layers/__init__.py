"""Layers: the sparse MoE layer and the paper-specific layers built on the same conventions."""
from .moe import MoE, routing_metrics

__all__ = ["MoE", "routing_metrics"]
