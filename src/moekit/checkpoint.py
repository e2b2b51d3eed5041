"""Checkpoints on torch.distributed.checkpoint (DCP): ``save(module, path)`` / ``load(module, path)``.

A checkpoint is a directory. Every rank writes its own shards of the model and the optimizer (expert
DTensors sharded over ``ep``, FSDP2 shards, replicated tensors once): no rank ever holds the whole
model. ``load`` reshards to the module's current layout — any expert-parallel and FSDP2 sizes, or a
single process without torch.distributed — with bit-identical tensors. The directory holds:

* DCP's files (``.metadata`` and ``__<rank>_<n>.distcp``): ``model.<name>`` for every entry of the
  model's state dict (tied weights under each of their names) and ``optim.<param>.<key>`` for every
  tensor of the optimizer state (through ``torch.distributed.checkpoint.state_dict``);
* ``moekit.json``: the format, each MoE layer's complete configuration (``layer.config.to_dict()``:
  every option that changes the output), the optimizer's class, param groups and non-tensor state, the
  saving world size and the caller's ``extra`` JSON (step, data position, loss history);
* ``rng/rank<r>.json``: the CPU (and CUDA) RNG states of every saving rank.

``load`` is strict and validates everything before it changes anything: a MoE layer configured
differently (the first differing field is named), tensors the module lacks or the file lacks, another
shape or dtype (dtypes are never cast: the error names the tensor and both dtypes), an optimizer of
another class or over parameters that are not the module's, a damaged ``moekit.json`` or RNG state —
each raises ``ValueError`` and leaves module and optimizer as they were. RNG states are restored when
the world size equals the saving one (otherwise left alone: another number of ranks draws other
streams anyway).

Atomic: ``path`` is a symbolic link to a hidden sibling directory ``.<name>.<n>``; a save writes a new
one, flushes it and swaps the link with one ``rename``. A save killed at any point leaves the previous
checkpoint readable; the next save removes what a killed one left behind. Files are created with the
process's umask; a replaced checkpoint keeps the directory mode of the one it replaces. Optimizer state
that is neither a tensor nor a JSON value (``torch.optim.LBFGS`` keeps lists of tensors) is refused
with a ``ValueError`` naming the optimizer and the entry. Under torch.distributed every rank calls
``save``/``load`` (they are collective); the directory must be on a file system all ranks share.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import uuid
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMAT = "moekit-checkpoint-2"
META = "moekit.json"


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() and dist.is_initialized() else None


def _rank_world() -> tuple[int, int]:
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (0, 1)


def _barrier() -> None:
    dist = _dist()
    if dist is not None:
        dist.barrier()


def _layers(module: nn.Module) -> dict[str, Any]:
    from .layers.moe import MoE
    return {name: m for name, m in module.named_modules() if isinstance(m, MoE)}


def layer_configs(module: nn.Module) -> dict[str, dict[str, Any]]:
    """``{layer name: complete configuration dict}`` of every MoE layer (what a checkpoint stores)."""
    return {name: layer.config.to_dict() for name, layer in _layers(module).items()}


def _is_dtensor(t) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(t, DTensor)


def _global_shape(t: Tensor) -> tuple[int, ...]:
    return tuple(t.shape)          # a DTensor reports its global shape


def _json_ok(v: Any) -> bool:
    try:
        json.dumps(v)
        return True
    except (TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------------
# state (model and optimizer) through torch.distributed.checkpoint.state_dict
def _reshard(module: nn.Module) -> None:
    """FSDP2 modules back to their sharded parameters (a root may keep its unsharded ones registered after
    a forward); the optimizer holds the sharded ones."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        return
    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def _check_optimizer(module: nn.Module, optimizer) -> None:
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer: expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    ids = {id(p) for p in module.parameters()}
    for gi, g in enumerate(optimizer.param_groups):
        for p in g["params"]:
            if id(p) not in ids:
                raise ValueError(f"optimizer: {type(optimizer).__name__} holds a parameter of shape {tuple(p.shape)} "
                                 f"(param group {gi}) that is not a parameter of module; build the optimizer "
                                 "over module.parameters()")


def _model_state(module: nn.Module) -> dict[str, Tensor]:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(module, options=StateDictOptions(ignore_frozen_params=False))


def _optim_state(module: nn.Module, optimizer) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors ``{"<param>.<key>": t}``, JSON ``{"class", "param_groups", "scalars"}``)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    osd = get_optimizer_state_dict(module, optimizer)
    name = type(optimizer).__name__
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pname, entry in osd["state"].items():
        for k, v in entry.items():
            if isinstance(v, Tensor):
                tensors[f"{pname}.{k}"] = v
            elif _json_ok(v):
                scalars.setdefault(pname, {})[k] = v
            else:
                raise ValueError(f"optimizer: {name} keeps state {k!r} of parameter {pname!r} as a "
                                 f"{type(v).__name__}, which moekit.checkpoint cannot store (tensors and JSON "
                                 "values only); checkpoint such an optimizer yourself")
    groups = []
    for gi, g in enumerate(osd["param_groups"]):
        hyper = {}
        for k, v in g.items():
            if isinstance(v, Tensor) and v.numel() == 1:
                v = v.item()
            if not _json_ok(v):
                raise ValueError(f"optimizer: {name} param group {gi} setting {k!r} is a {type(v).__name__}, not "
                                 "a JSON value; moekit.checkpoint cannot store it")
            hyper[k] = list(v) if isinstance(v, tuple) else v
        groups.append(hyper)
    return tensors, {"class": name, "param_groups": groups, "scalars": scalars}


# ---------------------------------------------------------------------------------------------------
# directory layout: path -> .<name>.<id> (a symbolic link swapped atomically)
def _versions(path: Path) -> list[Path]:
    if not path.parent.exists():
        return []
    return [p for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.")]


def _fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for f in files:
            fd = os.open(os.path.join(dirpath, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _broadcast(obj):
    dist = _dist()
    if dist is None:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())


def _rng_json() -> dict[str, Any]:
    out = {"cpu": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def _prepare(module: nn.Module, path, optimizer, extra):
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    path = Path(path)
    if path.exists() and not path.is_symlink():
        raise ValueError(f"path: {path} exists and is not a moekit checkpoint (a checkpoint path is a link moekit "
                         "manages); choose another path")
    if extra is not None and not _json_ok(extra):
        raise ValueError("extra: must be JSON-serialisable")
    _reshard(module)
    if optimizer is not None:
        _check_optimizer(module, optimizer)
    model = _model_state(module)
    optim_tensors, optim_meta = _optim_state(module, optimizer) if optimizer is not None else ({}, None)
    rank, world = _rank_world()
    meta = {"format": FORMAT, "world_size": world, "layers": layer_configs(module), "optimizer": optim_meta,
            "extra": extra}
    state = {"model": model}
    if optim_tensors:
        state["optim"] = optim_tensors
    return path, state, meta


def _finish(path: Path, tmp: Path, old_mode: int | None) -> None:
    """Rank 0: make ``tmp`` the checkpoint ``path`` points to, then remove every other version."""
    _fsync_tree(tmp)
    if old_mode is not None:
        os.chmod(tmp, old_mode)
    link = path.parent / f".{path.name}.link-{uuid.uuid4().hex[:8]}"
    os.symlink(tmp.name, link)
    os.replace(link, path)                                   # the one atomic step
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    for p in _versions(path):                                # the previous version and any litter
        if p.name != tmp.name:
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)


def _start(path: Path) -> tuple[Path, int | None]:
    """Rank 0 picks the new version's directory; every rank gets its name."""
    rank, _ = _rank_world()
    name, old_mode = None, None
    if rank == 0:
        path.parent.mkdir(parents=True, exist_ok=True)
        name = f".{path.name}.{uuid.uuid4().hex[:12]}"
        (path.parent / name / "rng").mkdir(parents=True)
        if path.is_symlink() and path.resolve().is_dir():
            old_mode = path.resolve().stat().st_mode & 0o7777
    name, old_mode = _broadcast((name, old_mode))
    return path.parent / name, old_mode


def save(module: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
         extra: dict[str, Any] | None = None) -> None:
    """Write ``module`` (and ``optimizer``, every rank's RNG state and ``extra``) to the checkpoint
    directory ``path``, atomically (see the module docstring). Collective under torch.distributed."""
    import torch.distributed.checkpoint as dcp
    path, state, meta = _prepare(module, path, optimizer, extra)
    rank, _ = _rank_world()
    tmp, old_mode = _start(path)
    try:
        _write_json(tmp / "rng" / f"rank{rank}.json", _rng_json())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
            dcp.save(state, checkpoint_id=str(tmp))
        if rank == 0:
            _write_json(tmp / META, meta)
        _barrier()
        if rank == 0:
            _finish(path, tmp, old_mode)
        _barrier()
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise


class AsyncSave:
    """A save in flight (from :func:`async_save`): call :meth:`result` on every rank before the next save
    (it waits for the writes, then makes the new checkpoint current)."""

    def __init__(self, future, path: Path, tmp: Path, old_mode: int | None, meta: dict):
        self._future, self._path, self._tmp, self._old_mode, self._meta = future, path, tmp, old_mode, meta
        self._done = False

    def result(self) -> None:
        if self._done:
            return
        rank, _ = _rank_world()
        try:
            self._future.result()
            if rank == 0:
                _write_json(self._tmp / META, self._meta)
            _barrier()
            if rank == 0:
                _finish(self._path, self._tmp, self._old_mode)
            _barrier()
        except BaseException:
            if rank == 0:
                shutil.rmtree(self._tmp, ignore_errors=True)
            raise
        finally:
            self._done = True


_ASYNC_GROUP: list = []          # one gloo group for background saves, made on the first async_save


def _async_group():
    dist = _dist()
    if dist is None:
        return None
    if not _ASYNC_GROUP:
        _ASYNC_GROUP.append(dist.new_group(backend="gloo"))
    return _ASYNC_GROUP[0]


def async_save(module: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None,
               extra: dict[str, Any] | None = None) -> AsyncSave:
    """Like :func:`save`, but returns once the state is copied (DCP's ``async_save`` stages it); the
    writes continue in a background thread and training may change the module meanwhile. The
    background coordination runs on its own gloo process group (made on the first call, collectively),
    so it never interleaves with the training's collectives. Call ``.result()`` on the returned object
    on every rank before the next save; the checkpoint becomes current then."""
    import torch.distributed.checkpoint as dcp
    path, state, meta = _prepare(module, path, optimizer, extra)
    group = _async_group()
    rank, _ = _rank_world()
    tmp, old_mode = _start(path)
    try:
        _write_json(tmp / "rng" / f"rank{rank}.json", _rng_json())
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=group)
    except BaseException:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    return AsyncSave(future, path, tmp, old_mode, meta)


# ---------------------------------------------------------------------------------------------------
def _invalid(path: Path, why: str) -> ValueError:
    return ValueError(f"path: {path} is not a valid moekit checkpoint ({why})")


def _read_meta(path: Path) -> tuple[dict, Any]:
    import torch.distributed.checkpoint as dcp
    if not path.exists():
        raise FileNotFoundError(f"path: no checkpoint at {path}")
    if not path.is_dir():
        raise _invalid(path, "not a directory")
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, ValueError) as e:
        raise _invalid(path, f"{META}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _invalid(path, f"format {meta.get('format') if isinstance(meta, dict) else meta!r:.80}, expected {FORMAT}")
    for key, kind in (("layers", dict), ("world_size", int)):
        if not isinstance(meta.get(key), kind):
            raise _invalid(path, f"{META} has no valid {key!r}")
    if meta.get("optimizer") is not None and not isinstance(meta["optimizer"], dict):
        raise _invalid(path, f"{META} has no valid 'optimizer'")
    try:
        tensors = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
    except Exception as e:  # noqa: BLE001 - any unreadable DCP metadata is a damaged checkpoint
        raise _invalid(path, f"DCP metadata: {type(e).__name__}: {e}") from None
    return meta, tensors


def _check_layers(saved: dict, module: nn.Module) -> None:
    from .config import first_difference
    current = layer_configs(module)
    if set(saved) != set(current):
        raise ValueError(f"checkpoint: MoE layers {sorted(saved)} in the file, {sorted(current)} in the module")
    for name, cfg in current.items():
        field = first_difference(saved[name], cfg)
        if field is not None:
            a, b = _lookup(saved[name], field), _lookup(cfg, field)
            raise ValueError(f"checkpoint: MoE layer {name or '<root>'!r} was saved with {field}={a!r}, but the "
                             f"module has {field}={b!r}")


def _lookup(d, dotted: str):
    for part in dotted.split("."):
        if isinstance(d, dict) and part in d:
            d = d[part]
        else:
            return "<absent>"
    return d


def _check_tensors(prefix: str, current: dict[str, Tensor], saved_md: dict, what: str) -> None:
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    saved = {k[len(prefix):]: v for k, v in saved_md.items() if k.startswith(prefix)}
    missing = sorted(set(current) - set(saved))
    unexpected = sorted(set(saved) - set(current))
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing from the file: {missing[:8]}{' …' if len(missing) > 8 else ''}")
        if unexpected:
            parts.append(f"in the file but not in the {what}: {unexpected[:8]}{' …' if len(unexpected) > 8 else ''}")
        raise ValueError(f"checkpoint: the {what}'s tensors differ from the file's — " + "; ".join(parts))
    for name, t in current.items():
        md = saved[name]
        if not isinstance(md, TensorStorageMetadata):
            raise ValueError(f"checkpoint: {name!r} is not a tensor in the file")
        if tuple(md.size) != _global_shape(t):
            raise ValueError(f"checkpoint: tensor {name!r} has shape {tuple(md.size)} in the file, "
                             f"{_global_shape(t)} in the {what}")
        if md.properties.dtype != t.dtype:
            raise ValueError(f"checkpoint: tensor {name!r} is {md.properties.dtype} in the file but {t.dtype} in "
                             f"the {what}; cast the {what} (or the file) first — load never casts")


def _read_rng(path: Path, meta: dict) -> dict | None:
    rank, world = _rank_world()
    if world != meta["world_size"]:
        return None
    f = path / "rng" / f"rank{rank}.json"
    try:
        d = json.loads(f.read_text())
        cpu = torch.frombuffer(bytearray(base64.b64decode(d["cpu"], validate=True)), dtype=torch.uint8)
        cuda = [torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)
                for s in d.get("cuda", [])]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _invalid(path, f"RNG state of rank {rank}: {type(e).__name__}: {e}") from None
    if cpu.numel() != torch.get_rng_state().numel():
        raise _invalid(path, f"RNG state of rank {rank} has {cpu.numel()} bytes, expected "
                             f"{torch.get_rng_state().numel()}")
    return {"cpu": cpu, "cuda": cuda}


def load(module: nn.Module, path: str | os.PathLike, optimizer: torch.optim.Optimizer | None = None, *,
         restore_rng: bool = True) -> dict[str, Any] | None:
    """Load the checkpoint at ``path`` into ``module`` (and ``optimizer``), resharding to the module's
    current layout; returns the saved ``extra``. Validates everything first (see the module docstring):
    on any ``ValueError`` module and optimizer are unchanged. Collective under torch.distributed."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    path = Path(path)
    meta, tensors_md = _read_meta(path)
    _reshard(module)
    _check_layers(meta["layers"], module)
    model = _model_state(module)
    _check_tensors("model.", model, tensors_md, "module")
    optim_meta = meta.get("optimizer")
    optim_current: dict[str, Tensor] = {}
    if optimizer is not None:
        _check_optimizer(module, optimizer)
        if optim_meta is None:
            raise ValueError("optimizer: the checkpoint holds no optimizer state")
        if optim_meta.get("class") != type(optimizer).__name__:
            raise ValueError(f"optimizer: the checkpoint was saved from {optim_meta.get('class')}, loading into "
                             f"{type(optimizer).__name__}")
        saved_names = [g.get("params") for g in optim_meta["param_groups"]]
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
        current_osd = get_optimizer_state_dict(module, optimizer)
        current_names = [g["params"] for g in current_osd["param_groups"]]
        if saved_names != current_names:
            raise ValueError("optimizer: its parameter groups differ from the saved ones (other parameters or "
                             "another grouping)")
        optim_current, _ = _optim_state(module, optimizer)
        _check_tensors("optim.", optim_current, tensors_md, "optimizer")
    rng = _read_rng(path, meta) if restore_rng else None

    # Read into copies (same sharding as the module's tensors); the module changes only after success.
    state = {"model": {k: v.detach().clone() for k, v in model.items()}}
    if optim_current:
        state["optim"] = {k: v.detach().clone() for k, v in optim_current.items()}
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*single process.*")
            dcp.load(state, checkpoint_id=str(path))
    except Exception as e:  # noqa: BLE001 - unreadable shard files: a damaged checkpoint
        raise _invalid(path, f"reading tensors: {type(e).__name__}: {e}") from None
    set_model_state_dict(module, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        osd_state: dict[str, dict[str, Any]] = {}
        for pname, entry in optim_meta.get("scalars", {}).items():
            osd_state.setdefault(pname, {}).update(entry)
        for key, t in state.get("optim", {}).items():
            pname, _, k = key.rpartition(".")
            osd_state.setdefault(pname, {})[k] = t
        groups = []
        for g, cur in zip(optim_meta["param_groups"], current_osd["param_groups"]):
            groups.append({k: (tuple(v) if isinstance(cur.get(k), tuple) and isinstance(v, list) else v)
                           for k, v in g.items()})
        set_optimizer_state_dict(module, optimizer, {"state": osd_state, "param_groups": groups})
    if rng is not None:
        torch.set_rng_state(rng["cpu"])
        if rng["cuda"] and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
    return meta.get("extra")
