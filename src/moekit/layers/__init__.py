"""Layers: the sparse MoE layer and the paper-specific layers built on the same conventions."""
from .classic import HierarchicalMixtureOfExperts, MixtureOfLocalExperts
from .condconv import CondConv2d, CondConvRouter, DynamicConv2d, anneal_temperature
from .fusion import SituationalFusion, affinity_penalty
from .hierarchical import HierarchicalMoE
from .moe import MoE, routing_metrics
from .multitask import MultiGateMoE

__all__ = ["CondConv2d", "CondConvRouter", "DynamicConv2d", "HierarchicalMixtureOfExperts", "HierarchicalMoE",
           "MixtureOfLocalExperts", "MoE", "MultiGateMoE", "SituationalFusion", "affinity_penalty",
           "anneal_temperature", "routing_metrics"]
