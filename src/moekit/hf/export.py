"""Export a patched (and trained, possibly distributed) transformers model in its family's own layout.

``save_pretrained(model, directory)`` writes what plain transformers reads back with
``AutoModel…from_pretrained(directory)``: ``config.json`` (and ``generation_config.json`` when the model
has one) and safetensors files holding every tensor under the family's own names — each
:class:`~moekit.hf.PatchedMoEBlock` written back into a block of the family (:func:`~moekit.hf.to_hf`,
which also checks that the layer still routes as that block does), everything else as it is.

Under torch.distributed every rank calls it (it is collective) with its part of the model (expert
DTensors, FSDP2 shards). The tensors are made whole one MoE block or one parameter at a time and
each is written by one rank, into that rank's own file (``model-0000r-of-0000W.safetensors``, with
``model.safetensors.index.json``): no rank ever holds the whole model. Tied weights are written once,
under the name transformers keeps.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor, nn

from .convert import PatchedMoEBlock, to_hf


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _full(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _fsdp_reshard(model: nn.Module) -> None:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _plain_layer(layer):
    """A non-distributed copy of a moekit layer with its whole tensors (collective for DTensors)."""
    from ..layers.moe import MoE
    plain = MoE.from_config(layer.config)
    state = {k: _full(v.detach()) for k, v in layer.state_dict().items()}
    plain.to(next(layer.experts.parameters()).dtype)             # the layer's compute dtype (bf16, …)
    plain.load_state_dict(state, strict=True)
    return plain


def _fresh_model(model: nn.Module) -> nn.Module:
    """The model's own transformers class built from its config on the meta device (names and blocks)."""
    with torch.device("meta"):
        return type(model)(model.config)


def save_pretrained(model: nn.Module, directory: str | os.PathLike) -> Path:
    """Write ``model`` (a transformers model patched with :func:`moekit.hf.patch`, trained or not) to
    ``directory`` in its family's transformers layout; returns the directory. Collective under
    torch.distributed (see the module docstring): one safetensors file per rank."""
    from safetensors.torch import save_file
    if not hasattr(model, "config") or not hasattr(model.config, "save_pretrained"):
        raise TypeError(f"model: expected a transformers model (with .config), got {type(model).__name__}")
    blocks = {n: m for n, m in model.named_modules() if isinstance(m, PatchedMoEBlock)}
    if not blocks:
        raise ValueError("model: has no patched MoE block (moekit.hf.patch); use its own save_pretrained")
    dist = _dist()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)
    directory = Path(directory)
    _fsdp_reshard(model)
    fresh = _fresh_model(model)
    wanted = set(fresh.state_dict().keys())
    tied: set[str] = set()                 # later names of a tensor shared with an earlier one (tied weights)

    mine: dict[str, Tensor] = {}
    owner_of: dict[str, int] = {}
    turn = 0
    # the MoE blocks, one at a time: whole layer -> a block of the family -> its tensors
    for name, patched in blocks.items():
        layer = _plain_layer(patched.moe)                               # collective for DTensors
        owner = turn % world
        turn += 1
        if rank == owner:
            block = fresh.get_submodule(name)
            block = block.to_empty(device="cpu").to(next(layer.parameters()).dtype)
            to_hf(layer, block)
            for k, v in block.state_dict().items():
                mine[f"{name}.{k}"] = v.detach().contiguous().clone()
        for k in fresh.get_submodule(name).state_dict().keys():
            owner_of[f"{name}.{k}"] = owner
    # everything else, one tensor at a time
    prefixes = tuple(f"{n}." for n in blocks)
    seen: dict[int, str] = {}
    for k, v in model.state_dict(keep_vars=True).items():
        if k.startswith(prefixes):
            continue
        if id(v) in seen:
            tied.add(k)
            continue
        seen[id(v)] = k
        full = _full(v.detach())                                        # collective for DTensors
        owner = turn % world
        turn += 1
        owner_of[k] = owner
        if rank == owner:
            mine[k] = full.contiguous().clone()
    written = set(owner_of)
    missing = sorted(wanted - tied - written)
    unexpected = sorted(written - wanted)
    if missing or unexpected:
        raise ValueError(f"model: does not map onto {type(model).__name__}'s own layout — missing {missing[:8]}, "
                         f"unexpected {unexpected[:8]}")
    if rank == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist:
        dist.barrier()
    if world == 1:
        files = {0: "model.safetensors"}
    else:
        files = {r: f"model-{r + 1:05d}-of-{world:05d}.safetensors" for r in range(world)}
    save_file(mine, str(directory / files[rank]), metadata={"format": "pt"})
    total = torch.tensor(float(sum(t.numel() * t.element_size() for t in mine.values())), dtype=torch.float64)
    if dist:
        dist.all_reduce(total)
    if rank == 0:
        model.config.save_pretrained(directory)
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(model, "can_generate", lambda: False)():
            gen.save_pretrained(directory)
        if world > 1:
            index = {"metadata": {"total_size": int(total.item())}, "weight_map": {k: files[r] for k, r in sorted(owner_of.items())}}
            (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if dist:
        dist.barrier()
    return directory
