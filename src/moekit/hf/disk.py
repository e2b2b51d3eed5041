"""Load a moekit MoE layer from the on-disk per-expert checkpoint layout (safetensors).

Legend (the package's, ``moekit/__init__.py``): E experts, D model dim, H expert hidden dim.

transformers writes MoE checkpoints in the models' original layout: one (out, in) Linear weight per
expert and projection — ``experts.{e}.w1/w3/w2.weight`` (Mixtral: gate, up, down) or
``experts.{e}.gate_proj/up_proj/down_proj.weight`` (Qwen-MoE, OLMoE, DeepSeek-V3, …) — next to the
router (``gate.weight`` or ``router.weight``, optional ``.bias`` and ``gate.e_score_correction_bias``)
and shared experts (``shared_expert.*`` or ``shared_experts.*``, ``shared_expert_gate.weight``).
Families that store stacked experts on disk too (GPT-OSS) load through ``from_pretrained`` and
:func:`moekit.hf.from_hf` instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch
from torch import Tensor

from ..layers.moe import MoE
from .families import fill

#: (gate, up, down) names of one expert's projections in the per-expert layouts
EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _read(source: str | os.PathLike | Mapping[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """The tensors under ``prefix`` (prefix stripped) from a dict, a .safetensors file or a folder of them."""
    if isinstance(source, Mapping):
        return {k[len(prefix):]: v for k, v in source.items() if k.startswith(prefix)}
    path = Path(source)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files or not all(f.is_file() for f in files):
        raise FileNotFoundError(f"source: no .safetensors file at {str(path)!r}")
    from safetensors import safe_open
    out: dict[str, Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                if k.startswith(prefix):
                    out[k[len(prefix):]] = fh.get_tensor(k)
    return out


def load_moe_state_dict(layer: MoE, source: str | os.PathLike | Mapping[str, Tensor], prefix: str = "") -> MoE:
    """Fill ``layer`` (a GLU :class:`~moekit.MoE`, e.g. built by :func:`moekit.hf.from_hf` or with the
    model's shapes) from the per-expert layout under ``prefix`` (e.g.
    ``"model.layers.0.block_sparse_moe."``) of a state dict, a ``.safetensors`` file or a folder of
    shards. Every parameter of the layer must be found; returns ``layer``."""
    if not isinstance(layer, MoE) or not hasattr(layer.experts, "w_in"):
        raise TypeError("layer: expected a moekit MoE with GLU experts (expert='glu')")
    sd = _read(source, prefix)
    if not sd:
        raise KeyError(f"prefix: no tensor under {prefix!r}")
    E = layer.num_experts
    t: dict[str, Tensor] = {}
    for rname in ("gate", "router"):
        if f"{rname}.weight" in sd:
            t["router.gate.weight"] = sd[f"{rname}.weight"]
            if f"{rname}.bias" in sd:
                t["router.bias"] = sd[f"{rname}.bias"]
            if f"{rname}.e_score_correction_bias" in sd:
                t["router.expert_bias"] = sd[f"{rname}.e_score_correction_bias"].reshape(-1)
    for gate, up, down in EXPERT_NAMES:
        if f"experts.0.{gate}.weight" in sd:
            try:
                w_in = [torch.cat([sd[f"experts.{e}.{gate}.weight"], sd[f"experts.{e}.{up}.weight"]], 0).t()
                        for e in range(E)]
                w_out = [sd[f"experts.{e}.{down}.weight"].t() for e in range(E)]
            except KeyError as err:
                raise KeyError(f"source: expert weight {prefix}{err.args[0]} missing for num_experts={E}") from None
            t["experts.w_in"], t["experts.w_out"] = torch.stack(w_in), torch.stack(w_out)
        for sname in ("shared_expert", "shared_experts"):
            if f"{sname}.{gate}.weight" in sd:
                w_in = torch.cat([sd[f"{sname}.{gate}.weight"], sd[f"{sname}.{up}.weight"]], 0).t()
                t["shared.bank.w_in"], t["shared.bank.w_out"] = w_in[None], sd[f"{sname}.{down}.weight"].t()[None]
    if "shared_expert_gate.weight" in sd:
        t["shared.gate.weight"] = sd["shared_expert_gate.weight"]
    expected = set(dict(layer.named_parameters()))
    missing = sorted(expected - set(t))
    if missing:
        raise KeyError(f"source: no weights under {prefix!r} for {missing} (found {sorted(sd)[:8]}...)")
    extra = sorted(set(t) - expected - {"router.expert_bias"})
    if extra:
        raise KeyError(f"layer: the checkpoint has {extra} that the layer lacks (build it with the model's options)")
    if "router.expert_bias" in t and not hasattr(layer.router, "expert_bias"):
        raise KeyError("layer: the checkpoint has a selection bias but the router has none (selection_bias=True)")
    return fill(layer, t)
