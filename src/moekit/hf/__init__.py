"""transformers interoperability (optional extra ``moekit[hf]``): convert the MoE blocks of the main
transformers MoE families to moekit layers and back, patch whole models, load the on-disk per-expert
checkpoint layout, upcycle dense models, and form transformers' balancing loss from moekit's
routing statistics.

Families: Mixtral, MiniMax, Qwen2-MoE, Qwen3-MoE, Qwen3-Next, OLMoE, FlexOlmo, Jamba, Granite-MoE,
DeepSeek-V3, GLM-4-MoE, ERNIE-4.5, GPT-OSS, Llama-4, DBRX, Switch Transformers (see :mod:`moekit.hf.families`). Importing this package
does not import transformers; the families' classes are looked up when a block is converted.
"""
from .convert import (PatchedMoEBlock, UpcycledMLP, aux_loss, balancing_loss, from_hf, patch, patched_blocks, to_hf,
                      upcycle)
from .disk import load_moe_state_dict
from .export import save_pretrained
from .families import FAMILIES, Family, family_of

__all__ = ["FAMILIES", "Family", "PatchedMoEBlock", "UpcycledMLP", "aux_loss", "balancing_loss", "family_of", "from_hf",
           "load_moe_state_dict", "patch", "patched_blocks", "save_pretrained", "to_hf", "upcycle"]
