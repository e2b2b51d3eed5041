"""Checkpoints that survive crashes and expert-parallel resharding: ``save(module, path)`` / ``load(module, path)``.

One safetensors file (never pickle) holds:
  * ``model/<name>`` — every parameter and buffer, *unsharded*: expert-parallel layers gather their
    experts from the expert-parallel group, so the file is the same whatever the EP size it was saved at;
  * ``optim/<param name>/<key>`` — the optimizer's per-parameter state (gathered the same way), with the
    param groups' hyper-parameters in the metadata;
  * ``rng/...`` — the CPU (and CUDA) RNG states of the saving rank;
  * metadata: each MoE layer's routing configuration (router, kind, top-k, capacity, renormalisation,
    number of experts, expert kind, …), checked field by field at load — a mismatch raises a
    ``ValueError`` naming the layer and the field — and the caller's ``extra`` JSON (step, data-loader
    position, loss history).

Writes are atomic: the file is written to a temporary name in the same directory, flushed to disk and
renamed over ``path``, so a save killed midway leaves the previous checkpoint intact. Under
torch.distributed every rank calls ``save``/``load`` (the gathers are collective); global rank 0 writes.
``load`` slices the expert tensors for the current EP size and rank — resharding is automatic.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .layers.moe import MoE

FORMAT = "moekit-checkpoint-1"


def _safetensors():
    try:
        import safetensors.torch as st
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("moekit.checkpoint needs safetensors: pip install safetensors "
                          "(or the 'distributed' extra)") from e
    return st


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def routing_config(layer: MoE) -> dict[str, Any]:
    """The settings that determine how ``layer`` routes (stored beside the weights, checked at load)."""
    r = layer.router
    cfg: dict[str, Any] = {
        "router": f"{type(r).__module__}.{type(r).__qualname__}",
        "kind": layer.kind,
        "dim": layer.dim,
        "hidden_dim": layer.hidden_dim,
        "num_experts": layer.num_experts,
        "top_k": layer.top_k,
        "capacity_factor": layer.capacity_factor,
        "capacity_multiple_of": layer.capacity_multiple_of,
        "group_size": layer.group_size,
        "batch_priority": layer.batch_priority,
        "expert": type(layer.experts).__qualname__,
        "shared_experts": None if layer.shared is None else layer.shared.hidden_dim,
    }
    for name in ("renormalize", "noise_std", "jitter", "normalize", "scale", "slots_per_expert", "capacity_factor"):
        if hasattr(r, name) and not isinstance(getattr(r, name), (Tensor, nn.Module)):
            cfg[f"router.{name}"] = getattr(r, name)
    for name in ("w_importance", "w_load", "w_switch", "w_z"):
        cfg[f"router.{name}"] = getattr(r, name)
    bank = layer.experts
    if hasattr(bank, "activation"):
        cfg["activation"] = bank.activation
    return cfg


def _moe_layers(module: nn.Module) -> dict[str, MoE]:
    return {name: m for name, m in module.named_modules() if isinstance(m, MoE)}


def _expert_params(module: nn.Module) -> dict[str, Any]:
    """``{full parameter name: ExpertParallelInfo}`` for the expert parameters of expert-parallel layers."""
    out = {}
    for lname, layer in _moe_layers(module).items():
        info = getattr(layer, "ep", None)
        if info is None:
            continue
        for pname, _ in layer.experts.named_parameters():
            out[f"{lname}.experts.{pname}" if lname else f"experts.{pname}"] = info
    return out


def _gather(t: Tensor, info) -> Tensor:
    """Concatenate the expert shards of ``t`` (leading dim) over the expert-parallel group."""
    dist = _dist()
    parts = [torch.empty_like(t) for _ in range(info.ep_size)]
    dist.all_gather(parts, t.contiguous(), group=info.ep_group)
    return torch.cat(parts, dim=0)


def _shard(t: Tensor, info) -> Tensor:
    if t.shape[0] != info.num_experts:
        raise ValueError(f"checkpoint: an expert tensor has leading size {t.shape[0]}, expected "
                         f"num_experts={info.num_experts}")
    return t[info.first:info.first + info.num_local].clone()


def save(module: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
         extra: dict[str, Any] | None = None) -> None:
    """Write ``module`` (and ``optimizer``, the RNG state and ``extra``) to ``path`` atomically.

    Under torch.distributed every rank must call it; global rank 0 writes the file; all ranks return
    after it is complete.
    """
    st = _safetensors()
    path = Path(path)
    if extra is not None:
        try:
            extra_json = json.dumps(extra)
        except TypeError as e:
            raise ValueError(f"extra: must be JSON-serialisable ({e})") from None
    else:
        extra_json = "null"
    experts = _expert_params(module)
    tensors: dict[str, Tensor] = {}
    for name, t in module.state_dict().items():
        t = t.detach()
        if name in experts:
            t = _gather(t, experts[name])
        tensors[f"model/{name}"] = t.cpu().contiguous()

    optim_meta = None
    if optimizer is not None:
        names = {id(p): n for n, p in module.named_parameters()}
        groups = []
        for g in optimizer.param_groups:
            hyper = {k: v for k, v in g.items() if k != "params"}
            try:
                json.dumps(hyper)
            except TypeError as e:
                raise ValueError(f"optimizer: a param-group setting is not JSON-serialisable ({e})") from None
            missing = [p for p in g["params"] if id(p) not in names]
            if missing:
                raise ValueError("optimizer: holds parameters that are not in module")
            groups.append({"params": [names[id(p)] for p in g["params"]], "hyper": hyper})
        scalars: dict[str, dict[str, Any]] = {}
        for g in optimizer.param_groups:
            for p in g["params"]:
                name = names[id(p)]
                for k, v in optimizer.state.get(p, {}).items():
                    if isinstance(v, Tensor):
                        v = v.detach()
                        if name in experts and v.dim() > 0 and v.shape == p.shape:
                            v = _gather(v, experts[name])
                        tensors[f"optim/{name}/{k}"] = v.cpu().contiguous()
                    else:
                        scalars.setdefault(name, {})[k] = v
        optim_meta = {"class": type(optimizer).__name__, "groups": groups, "scalars": scalars}

    tensors["rng/cpu"] = torch.get_rng_state()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng/cuda/{i}"] = s
    meta = {
        "format": FORMAT,
        "moe": json.dumps({name: routing_config(m) for name, m in _moe_layers(module).items()}),
        "optimizer": json.dumps(optim_meta),
        "extra": extra_json,
    }
    dist = _dist()
    if dist is None or dist.get_rank() == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        try:
            st.save_file(tensors, tmp, metadata=meta)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise
    if dist is not None:
        dist.barrier()


def _check_config(saved: dict[str, dict[str, Any]], module: nn.Module) -> None:
    current = {name: routing_config(m) for name, m in _moe_layers(module).items()}
    if set(saved) != set(current):
        raise ValueError(f"checkpoint: MoE layers {sorted(saved)} in the file, {sorted(current)} in the module")
    for name, cfg in current.items():
        for field in sorted(set(cfg) | set(saved[name])):
            a, b = saved[name].get(field), cfg.get(field)
            if a != b and not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and float(a) == float(b)):
                raise ValueError(f"checkpoint: MoE layer {name!r} was saved with {field}={a!r}, but the module has "
                                 f"{field}={b!r}")


def load(module: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
         restore_rng: bool = True) -> dict[str, Any] | None:
    """Load a checkpoint written by :func:`save` into ``module`` (and ``optimizer``), resharding the
    experts to the module's current expert-parallel size; returns the saved ``extra``.

    Raises ``ValueError`` naming the layer and field when a MoE layer's routing configuration differs
    from the saved one, and when the file is not a moekit checkpoint.
    """
    st = _safetensors()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"path: {path} is not a moekit checkpoint (format {meta.get('format')!r})")
    _check_config(json.loads(meta["moe"]), module)
    tensors = st.load_file(str(path))
    experts = _expert_params(module)
    state = {}
    for name, ref in module.state_dict().items():
        key = f"model/{name}"
        if key not in tensors:
            raise ValueError(f"checkpoint: no tensor for {name!r}")
        t = tensors[key]
        if name in experts:
            t = _shard(t, experts[name])
        state[name] = t.to(device=ref.device, dtype=ref.dtype)
    module.load_state_dict(state)

    optim_meta = json.loads(meta["optimizer"])
    if optimizer is not None:
        if optim_meta is None:
            raise ValueError("optimizer: the checkpoint holds no optimizer state")
        if optim_meta["class"] != type(optimizer).__name__:
            raise ValueError(f"optimizer: saved from {optim_meta['class']}, loading into {type(optimizer).__name__}")
        names = {id(p): n for n, p in module.named_parameters()}
        params = {n: p for n, p in module.named_parameters()}
        current = [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
        saved = [g["params"] for g in optim_meta["groups"]]
        if current != saved:
            raise ValueError("optimizer: its parameter groups differ from the saved ones")
        saved_state: dict[str, dict[str, Tensor]] = {}        # "optim/<param>/<key>", grouped once
        for key, t in tensors.items():
            if key.startswith("optim/"):
                name, _, k = key[len("optim/"):].rpartition("/")
                saved_state.setdefault(name, {})[k] = t
        osd = {"state": {}, "param_groups": []}
        index = 0
        for g, gm in zip(optimizer.param_groups, optim_meta["groups"]):
            ids = []
            for name in gm["params"]:
                entry = dict(optim_meta["scalars"].get(name, {}))
                for k, t in saved_state.get(name, {}).items():
                    if name in experts and t.dim() > 0 and t.shape[0] == experts[name].num_experts and \
                            t.shape[1:] == params[name].shape[1:]:
                        t = _shard(t, experts[name])
                    entry[k] = t.to(params[name].device)
                if entry:
                    osd["state"][index] = entry
                ids.append(index)
                index += 1
            osd["param_groups"].append({**gm["hyper"], "params": ids})
        optimizer.load_state_dict(osd)
    if restore_rng:
        torch.set_rng_state(tensors["rng/cpu"])
        cuda = sorted(k for k in tensors if k.startswith("rng/cuda/"))
        if cuda and torch.cuda.is_available():
            torch.cuda.set_rng_state_all([tensors[k] for k in cuda])
    return json.loads(meta["extra"])
