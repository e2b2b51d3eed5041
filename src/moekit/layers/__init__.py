"""Layers: the sparse MoE layer and the paper-specific layers built on the same conventions."""
from .fusion import SituationalFusion, affinity_penalty
from .hierarchical import HierarchicalMoE
from .moe import MoE, routing_metrics
from .multitask import MultiGateMoE

__all__ = ["HierarchicalMoE", "MoE", "MultiGateMoE", "SituationalFusion", "affinity_penalty", "routing_metrics"]
