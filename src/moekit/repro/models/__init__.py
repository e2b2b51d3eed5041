"""Models from the papers, built from moekit's layers (kept apart from the library core).

| model | paper | module |
|---|---|---|
| ``ChenMoE``, ``ChenSingle`` | Chen et al. 2022 (cluster structure; data: ``moekit.repro.datasets.chen_clusters``) | ``chen2022`` |
| ``ShazeerMoEClassifier`` | Shazeer et al. 2017 (noisy top-k, balancing) | ``shazeer`` |
| ``ShazeerLM`` | Shazeer et al. 2017 (LSTM language model with an MoE at every time step) | ``shazeer_lm`` |
| ``CondConvNet`` | Yang et al. 2019 (CondConv), Chen et al. 2020 (Dynamic Conv) | ``cnn`` |
| ``DeepMoEResNet``, ``deepmoe_resnet`` | Wang et al. 2020 (DeepMoE) | ``deepmoe_resnet`` |
| ``ViT`` | Riquelme et al. 2021 (V-MoE, Batch Priority Routing) | ``vit`` |
| ``MLPMixer``, ``SparseMixerBlock`` | Lou et al. 2021 (Sparse-MLP) | ``mixer`` |
| ``PatchMoE``, ``PatchRouter``, ``SmallCNN`` | Chen et al. 2022 (rotate task) | ``patch_moe`` |
| ``SplitInputMixture`` | Nowlan & Hinton 1990 (speaker-gated vowel mixture) | ``speaker_gated`` |
| ``MultiTaskRegressor`` | Ma et al. 2018 (MMoE, OMoE, shared-bottom) | ``multitask`` |
| ``BackpropNet``, ``SingleNet`` | Jacobs et al. 1991; Bishop, PRML (the plain baselines) | ``baselines`` |
| ``MLPPolicy``, ``FusionPolicy``, ``FrozenExpertFusion``, ``GatedFeatureFusion`` | situational fusion of visual representations (navigation) | ``navigation`` |
"""
from .baselines import BackpropNet, SingleNet
from .chen2022 import ChenMoE, ChenSingle
from .cnn import CondConvNet
from .deepmoe_resnet import DeepMoEResNet, deepmoe_resnet
from .mixer import MixerBlock, MLPMixer, SparseMixerBlock, count_parameters
from .multitask import MultiTaskRegressor
from .navigation import FrozenExpertFusion, FusionPolicy, GatedFeatureFusion, MLPPolicy
from .patch_moe import PatchMoE, PatchRouter, SmallCNN, patch_sum
from .shazeer import ShazeerMoEClassifier
from .speaker_gated import SplitInputMixture
from .shazeer_lm import ShazeerLM
from .vit import ViT

__all__ = ["BackpropNet", "ChenMoE", "ChenSingle", "CondConvNet", "DeepMoEResNet", "FrozenExpertFusion", "FusionPolicy", "GatedFeatureFusion", "MLPMixer",
           "MLPPolicy", "MultiTaskRegressor", "SingleNet", "SplitInputMixture", "MixerBlock", "PatchMoE", "PatchRouter", "ShazeerLM", "ShazeerMoEClassifier", "SmallCNN",
           "SparseMixerBlock", "ViT", "count_parameters", "deepmoe_resnet", "patch_sum"]
