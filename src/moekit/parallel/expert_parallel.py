"""Expert parallelism on a named DeviceMesh: expert weights as DTensors sharded over the ``ep`` dimension.

Legend: E experts per layer, P expert-parallel size, W ranks of the mesh (data-parallel × P).

``expert_parallel(model, mesh, ep_dim="ep")`` takes a ``DeviceMesh`` whose dimensions are all data
parallel except ``ep_dim`` (for example ``("dp", "ep")``, or a 1-D ``("ep",)``; a sub-mesh of a larger
mesh — one pipeline stage — is fine). Every rank builds the same full model (same seed) first; then:

* each stacked expert parameter (leading dimension E) of every :class:`~moekit.MoE` becomes a
  ``DTensor`` on ``mesh[ep_dim]`` with placement ``Shard(0)``: this rank keeps experts
  ``[r·E/P, (r+1)·E/P)``, the bank computes on that local shard, and the parameter still describes the
  whole (E, …) tensor — DCP, FSDP2 and :func:`clip_grad_norm_` see where every expert lives;
* the layer's dispatcher becomes an :class:`~moekit.parallel.AllToAllDispatcher` over the ``ep`` group;
* the routing statistics (``balance_group``) and every selection-bias update (``router.bias_group``)
  are summed over all ranks of the mesh (its data-parallel and expert-parallel dimensions), so every
  replica keeps the same bias and balances the global batch.

Gradients. Each rank runs its own slice of the global batch and its own mean loss. The all-to-all
backward already sums, into each expert shard, the gradient from every ``ep`` rank's tokens; what is
left is the data-parallel reduction. Either apply FSDP2 with :func:`~moekit.parallel.fully_shard_moe`
(it reduces every gradient to the global-batch mean), or call :func:`sync_gradients` after ``backward``
(bucketed all-reduces: replicated parameters over all W ranks, expert shards over their data-parallel
replicas, everything divided by W).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..experts import ModuleExperts
from ..layers.moe import MoE
from .dispatcher import AllToAllDispatcher



def _dtensor_api():
    from torch.distributed.tensor import DTensor, Shard
    return DTensor, Shard


def is_dtensor(t) -> bool:
    DTensor, _ = _dtensor_api()
    return isinstance(t, DTensor)


def moe_layers(module: nn.Module) -> dict[str, MoE]:
    """``{qualified name: layer}`` of every :class:`~moekit.MoE` inside ``module`` (itself included)."""
    return {name: m for name, m in module.named_modules() if isinstance(m, MoE)}


def expert_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """``{qualified name: parameter}`` of the routed experts (every MoE layer's ``.experts`` bank).

    The one definition of "expert parameter" the parallel helpers and the checkpoints use: these are the
    parameters expert parallelism shards; everything else (routers, shared experts, the rest of the
    model) is replicated over the expert-parallel ranks. Names are as in ``module.named_parameters()``.
    """
    wanted = {}
    for lname, layer in moe_layers(module).items():
        for pname, p in layer.experts.named_parameters():
            wanted[id(p)] = None
    return {name: p for name, p in module.named_parameters(remove_duplicate=False) if id(p) in wanted}


def mesh_group(mesh):
    """One process group over all ranks of ``mesh`` (a 1-D mesh's own group; a flattened one otherwise)."""
    if mesh.ndim == 1:
        return mesh.get_group(0)
    return mesh._flatten().get_group(0)


def _check_mesh(mesh, ep_dim: str):
    from torch.distributed.device_mesh import DeviceMesh
    if not isinstance(mesh, DeviceMesh):
        raise TypeError(f"mesh: expected a torch.distributed DeviceMesh with named dimensions, got "
                        f"{type(mesh).__name__}")
    names = mesh.mesh_dim_names
    if not names or ep_dim not in names:
        raise ValueError(f"ep_dim: the mesh has no dimension named {ep_dim!r} (its dimensions: "
                         f"{tuple(names) if names else 'unnamed'}); name the expert-parallel dimension with "
                         "init_device_mesh(..., mesh_dim_names=(..., 'ep')) or pass ep_dim=<its name>")
    if mesh.get_coordinate() is None:
        raise ValueError("mesh: this rank is not part of the mesh; call expert_parallel on the ranks of the "
                         "mesh only")


def _check_not_wrapped(module: nn.Module) -> None:
    from torch.nn.parallel import DistributedDataParallel
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without FSDP2
        FSDPModule = ()
    for name, m in module.named_modules():
        if isinstance(m, DistributedDataParallel) or (FSDPModule and isinstance(m, FSDPModule)):
            raise ValueError(f"module: {name or 'the model'} is already wrapped by {type(m).__name__}; call "
                             "expert_parallel before DDP/fully_shard (moekit.parallel.fully_shard_moe applies "
                             "FSDP2 afterwards)")
    for name, p in module.named_parameters():
        if is_dtensor(p):
            raise ValueError(f"module: parameter {name!r} is already a DTensor (the model is already "
                             "expert-parallel or sharded); call expert_parallel once, on the full model")


@torch.no_grad()
def _check_replicas_agree(module: nn.Module, group) -> None:
    """Every rank must start from the same weights: one all-reduce of a checksum (max of ±value)."""
    tensors = [p for p in list(module.parameters()) + list(module.buffers()) if p.numel()]
    device = tensors[0].device if tensors else torch.device("cpu")
    sums = []
    for p in tensors:                   # summed where the weights live: one copy to the host at the end
        t = p.detach().double()
        w = torch.linspace(1.0, 2.0, t.numel(), dtype=torch.float64, device=t.device)
        sums.append(torch.stack([t.sum(), (t.flatten() * w).sum(), t.square().sum()]).to(device))
    c = torch.stack(sums).sum(0).cpu() if sums else torch.zeros(3, dtype=torch.float64)
    c = torch.nan_to_num(c, nan=1e300, posinf=1e300, neginf=-1e300)
    both = torch.cat([c, -c])
    dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group)
    if not torch.equal(both[:3], -both[3:]):
        raise ValueError("module: its weights differ across the ranks of the mesh; build the model with the same "
                         "seed on every rank (or load the same weights) before expert_parallel")


def expert_parallel(module: nn.Module, mesh, ep_dim: str = "ep", *, global_balance: bool = True) -> nn.Module:
    """Shard the experts of every :class:`~moekit.MoE` in ``module`` over ``mesh[ep_dim]``, in place.

    ``mesh``: a DeviceMesh with named dimensions; ``ep_dim`` names the expert-parallel one, every other
    dimension is data parallel. ``global_balance``: sum the routing statistics over the whole mesh before
    the balancing losses are formed (global-batch balancing; ``False`` keeps per-rank statistics).
    Raises ``ValueError`` (naming the argument) for a mesh without ``ep_dim``, an E that does not split
    over the ep size, a model already wrapped (DDP/FSDP) or already expert-parallel, or weights that
    differ across the mesh's ranks — all before anything is changed.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("expert_parallel: torch.distributed is not initialised (init_process_group first)")
    _check_mesh(mesh, ep_dim)
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    _check_not_wrapped(module)
    ep_mesh = mesh[ep_dim]
    ep_group = ep_mesh.get_group(0)
    ep_size = ep_mesh.size()
    ep_rank = ep_mesh.get_local_rank(0)
    layers = moe_layers(module)
    if not layers:
        raise ValueError("module: contains no moekit.MoE layer")
    for lname, layer in layers.items():                    # check every layer before changing any
        if layer.num_experts % ep_size:
            raise ValueError(f"num_experts: layer {lname or '<root>'!r} has {layer.num_experts} experts, which do "
                             f"not split over the expert-parallel size {ep_size} (mesh dimension {ep_dim!r}); "
                             "num_experts must be divisible by it")
        if isinstance(layer.experts, ModuleExperts):
            raise ValueError(f"module: layer {lname or '<root>'!r} has a list of expert modules; expert "
                             "parallelism needs a stacked bank (expert='glu' or 'mlp')")
        for pname, p in layer.experts.named_parameters(recurse=False):
            if p.dim() == 0 or p.shape[0] != layer.num_experts:
                raise ValueError(f"module: expert parameter {pname!r} of layer {lname or '<root>'!r} has shape "
                                 f"{tuple(p.shape)}, not (num_experts={layer.num_experts}, ...); cannot shard it")
    world_group = mesh_group(mesh)
    _check_replicas_agree(module, world_group)

    DTensor, Shard = _dtensor_api()
    for layer in layers.values():
        E = layer.num_experts
        n = E // ep_size
        bank = layer.experts
        for pname, p in list(bank.named_parameters(recurse=False)):
            local = p.detach()[ep_rank * n:(ep_rank + 1) * n].clone()
            shard = DTensor.from_local(local, ep_mesh, [Shard(0)], run_check=False)
            setattr(bank, pname, nn.Parameter(shard, requires_grad=p.requires_grad))
        layer.dispatcher = AllToAllDispatcher(ep_group, E, mesh=mesh)
        layer.balance_group = world_group if global_balance else None
        if hasattr(layer.router, "bias_group"):
            layer.router.bias_group = world_group
    return module


def parallel_mesh(module: nn.Module):
    """The mesh :func:`expert_parallel` placed ``module``'s MoE layers on (None when it was not called)."""
    meshes = {id(m.dispatcher.mesh): m.dispatcher.mesh for m in moe_layers(module).values()
              if isinstance(m.dispatcher, AllToAllDispatcher) and m.dispatcher.mesh is not None}
    if len(meshes) > 1:
        raise ValueError("module: its MoE layers were placed on different meshes")
    return next(iter(meshes.values()), None)


def _local(t):
    return t.to_local() if is_dtensor(t) else t


def _bucketed_all_reduce(tensors: list[torch.Tensor], group, bucket_bytes: int = 25 << 20) -> None:
    """Sum ``tensors`` over ``group`` in place, a few flat buckets per dtype (one collective per bucket)."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        bucket, size = [], 0
        for t in ts + [None]:
            if t is not None:
                bucket.append(t)
                size += t.numel() * t.element_size()
            if bucket and (t is None or size >= bucket_bytes):
                flat = torch.cat([b.reshape(-1) for b in bucket])
                dist.all_reduce(flat, group=group)
                offset = 0
                for b in bucket:
                    b.copy_(flat[offset:offset + b.numel()].view_as(b))
                    offset += b.numel()
                bucket, size = [], 0


@torch.no_grad()
def sync_gradients(module: nn.Module, mesh=None, ep_dim: str = "ep") -> None:
    """Average gradients to the single-process gradient of the global-batch mean loss without FSDP/DDP.

    Replicated parameters are summed over all W ranks of the mesh, expert shards over their
    data-parallel replicas (the all-to-all backward has summed over the ``ep`` ranks already); all are
    divided by W. Bucketed: one all-reduce per ~25 MB per group. Call after the last ``backward`` of a
    step, on every rank. Prefer :func:`~moekit.parallel.fully_shard_moe` (FSDP2), which overlaps this
    with the backward.
    """
    mesh = mesh if mesh is not None else parallel_mesh(module)
    if mesh is None:
        raise ValueError("mesh: module is not expert-parallel; pass the mesh it is data-parallel over")
    W = mesh.size()
    experts = {id(p) for p in expert_parameters(module).values()}
    replicated, sharded = [], []
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        (sharded if id(p) in experts else replicated).append(_local(p.grad))
    _bucketed_all_reduce(replicated, mesh_group(mesh))
    dp_names = [n for n in mesh.mesh_dim_names if n != ep_dim]
    if dp_names and math.prod(mesh[n].size() for n in dp_names) > 1:
        dp_mesh = mesh[tuple(dp_names)] if len(dp_names) > 1 else mesh[dp_names[0]]
        _bucketed_all_reduce(sharded, mesh_group(dp_mesh))
    for g in replicated + sharded:
        g.div_(W)
