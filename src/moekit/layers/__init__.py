"""Layers: the sparse MoE layer and the paper-specific layers built on the same conventions."""
from .classic import HierarchicalMixtureOfExperts, MixtureOfLocalExperts
from .condconv import CondConv2d, CondConvRouter, DynamicConv2d, anneal_temperature
from .deepmoe import DeepMoEOutput, GatedConv2d, MultiHeadGate, ShallowEmbedding, deepmoe_aux_loss, embedding_loss, gate_l1
from .fusion import SituationalFusion, affinity_penalty
from .hierarchical import HierarchicalMoE
from .moe import MoE
from .shared import SharedExperts
from .multitask import MultiGateMoE

__all__ = ["CondConv2d", "CondConvRouter", "DeepMoEOutput", "DynamicConv2d", "GatedConv2d", "MultiHeadGate",
           "ShallowEmbedding", "deepmoe_aux_loss", "embedding_loss", "gate_l1", "HierarchicalMixtureOfExperts", "HierarchicalMoE",
           "MixtureOfLocalExperts", "MoE", "MultiGateMoE", "SituationalFusion", "affinity_penalty",
           "SharedExperts", "anneal_temperature"]
