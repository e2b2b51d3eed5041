"""FSDP2 and DDP for expert-parallel models, and the global gradient norm across their meshes.

Legend: W ranks of the mesh, P expert-parallel size, dp = W / P data-parallel replicas of each expert.

Recipe (every rank, after ``expert_parallel(model, mesh)`` on a ``("dp", "ep")`` mesh)::

    fully_shard_moe(model, mesh)          # FSDP2; or: model = replicate_moe(model, mesh)  (DDP)
    for x, t in batches:                  # each rank its own slice of the global batch
        loss = loss_fn(model(x), t)       # this rank's mean loss
        loss.backward()
        clip_grad_norm_(model, 1.0)       # the single-process global norm
        opt.step(); opt.zero_grad()

Gradients then equal the single-process gradient of the global-batch mean loss. Non-expert parameters
are averaged over all W ranks. Expert shards already hold, after the all-to-all backward, the sum over
the P ranks of their tokens; they are summed over their dp replicas and divided by W (FSDP2: sharded
over the mesh's data-parallel dimensions with a gradient divide factor of W — the expert-FSDP layout).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from .expert_parallel import _local, expert_parameters, is_dtensor, mesh_group, moe_layers, parallel_mesh


def _resolve_mesh(module: nn.Module, mesh, ep_dim: str):
    if mesh is None:
        mesh = parallel_mesh(module)
        if mesh is None:
            raise ValueError("module: not expert-parallel; call moekit.parallel.expert_parallel(module, mesh) first "
                             "(or pass mesh=)")
    if ep_dim not in (mesh.mesh_dim_names or ()):
        raise ValueError(f"ep_dim: the mesh has no dimension named {ep_dim!r} (its dimensions: "
                         f"{mesh.mesh_dim_names})")
    return mesh


def _dp_mesh(mesh, ep_dim: str):
    """The mesh's data-parallel dimensions as one 1-D mesh (None when there are none): the experts are
    fully sharded over all their data-parallel replicas."""
    names = tuple(n for n in mesh.mesh_dim_names if n != ep_dim)
    if not names:
        return None
    return mesh[names[0]] if len(names) == 1 else mesh[names]._flatten()


def _whole_mesh(mesh):
    return mesh if mesh.ndim == 1 else mesh._flatten()


def _scale_expert_grads(params, factor: float) -> None:
    for p in params:
        if p.requires_grad:
            p.register_hook(lambda g, f=factor: g / f)


def fully_shard_moe(module: nn.Module, mesh=None, ep_dim: str = "ep", **fsdp_kwargs) -> nn.Module:
    """Apply FSDP2 (``torch.distributed.fsdp.fully_shard``) to an expert-parallel model, in place.

    * each MoE layer's expert bank: sharded over the mesh's data-parallel dimensions (its experts are
      already split over ``ep``), gradients divided by W;
    * each MoE layer (router, shared experts) and then ``module`` itself (everything else): sharded
      over all W ranks of the mesh.
    Without data-parallel dimensions the experts are left to expert parallelism alone (their gradients
    are divided by W in a hook). ``fsdp_kwargs`` (``mp_policy``, ``reshard_after_forward``, …) go to
    every ``fully_shard`` call. Wrap further submodules (transformer blocks) yourself first, bottom-up,
    with ``fully_shard(block, mesh=<the flattened mesh>, ignored_params=<their expert parameters>)`` if
    you want per-block groups.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard
    mesh = _resolve_mesh(module, mesh, ep_dim)
    if isinstance(module, FSDPModule):
        raise ValueError("module: already wrapped by fully_shard; call fully_shard_moe once, on the whole model")
    W = mesh.size()
    dp_mesh = _dp_mesh(mesh, ep_dim)
    whole = _whole_mesh(mesh)
    experts = expert_parameters(module)
    layers = moe_layers(module)
    expert_ids = {id(p) for p in experts.values()}
    ignored: set[nn.Parameter] = set()
    for layer in layers.values():
        bank_params = list(layer.experts.parameters())
        if dp_mesh is not None:
            fully_shard(layer.experts, mesh=dp_mesh, **fsdp_kwargs)
            layer.experts.set_gradient_divide_factor(float(W))
            if dist.get_backend(mesh_group(dp_mesh)) == "gloo":    # gloo has no pre-multiplied sum
                layer.experts.set_force_sum_reduction_for_comms(True)
        else:
            _scale_expert_grads(bank_params, float(W))
            ignored.update(bank_params)
    if dp_mesh is None:
        ignored = {p for p in module.parameters() if id(p) in expert_ids}
    for layer in layers.values():
        if layer is not module:
            fully_shard(layer, mesh=whole, ignored_params=ignored or None, **fsdp_kwargs)
    fully_shard(module, mesh=whole, ignored_params=ignored or None, **fsdp_kwargs)
    return module


def replicate_moe(module: nn.Module, mesh=None, ep_dim: str = "ep", **ddp_kwargs) -> nn.Module:
    """DDP for an expert-parallel model: returns ``DistributedDataParallel(module)`` over all W ranks of
    the mesh for the non-expert parameters; the expert shards are left out of DDP (it would overwrite
    them with rank 0's) and reduced over their data-parallel replicas by gradient hooks. Gradients equal
    the single-process gradient of the global-batch mean loss; ``no_sync`` applies to the DDP part only
    (expert shards are reduced every backward).
    """
    from torch.nn.parallel import DistributedDataParallel
    mesh = _resolve_mesh(module, mesh, ep_dim)
    W = mesh.size()
    experts = expert_parameters(module)
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, list(experts))
    dp_mesh = _dp_mesh(mesh, ep_dim)
    dp_group = mesh_group(dp_mesh) if dp_mesh is not None and dp_mesh.size() > 1 else None
    for p in {id(p): p for p in experts.values()}.values():
        if not p.requires_grad:
            continue

        def reduce(g, group=dp_group):
            local = _local(g)
            if group is not None:
                local = local.clone()
                dist.all_reduce(local, group=group)
            out = local / W
            if is_dtensor(g):
                from torch.distributed.tensor import DTensor
                return DTensor.from_local(out, g.device_mesh, g.placements, run_check=False)
            return out
        p.register_hook(reduce)
    return DistributedDataParallel(module, process_group=mesh_group(mesh), **ddp_kwargs)


def _copies(t, mesh_size: int) -> int:
    """How many ranks of the reduction mesh hold the same local shard of ``t``."""
    if not is_dtensor(t):
        return mesh_size
    m = t.device_mesh
    shards = 1
    for dim, pl in enumerate(t.placements):
        if pl.is_partial():
            raise ValueError("module: a gradient is still a partial sum (reduce it before clipping)")
        if not pl.is_replicate():              # Shard, and FSDP2's strided shard over a sharded dim
            shards *= m.size(dim)
    if mesh_size % shards:
        raise ValueError("mesh: a gradient is sharded over ranks outside the mesh; pass the mesh the model is "
                         "parallel over")
    return mesh_size // shards


@torch.no_grad()
def clip_grad_norm_(module: nn.Module, max_norm: float, norm_type: float = 2.0, mesh=None,
                    error_if_nonfinite: bool = False) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model, whichever ranks hold which gradient.

    Expert gradients sharded over ``ep`` (and over data-parallel ranks by FSDP2), non-expert gradients
    sharded by FSDP2 or replicated: each rank adds its local shards' contributions, each weighted by
    one over the number of ranks holding that shard, and one all-reduce over the mesh gives the norm a
    single process would compute. Scales the gradients in place by ``min(1, max_norm / (norm + 1e-6))``
    like torch; returns the total norm. ``mesh``: the mesh the model is parallel over (default: the one
    ``expert_parallel`` was given); without one (a single process), torch's own function.
    """
    if not isinstance(max_norm, (int, float)) or isinstance(max_norm, bool) or not max_norm > 0:
        raise ValueError(f"max_norm: must be a positive number, got {max_norm!r}")
    norm_type = float(norm_type)
    if not (norm_type > 0):
        raise ValueError(f"norm_type: must be positive (or inf), got {norm_type!r}")
    params = [p for p in module.parameters() if p.grad is not None]
    mesh = mesh if mesh is not None else parallel_mesh(module)
    if mesh is None:
        if any(is_dtensor(p.grad) for p in params):
            raise ValueError("mesh: the gradients are sharded but module is not expert-parallel; pass the mesh")
        return torch.nn.utils.clip_grad_norm_(params, max_norm, norm_type, error_if_nonfinite=error_if_nonfinite)
    size = mesh.size()
    grads = [p.grad for p in params]
    dtype = torch.float64 if any(g.dtype == torch.float64 for g in grads) else torch.float32
    device = grads[0].device if grads else torch.device("cpu")
    if math.isinf(norm_type):
        local = torch.zeros((), dtype=dtype, device=device)
        for g in grads:
            if _local(g).numel():
                local = torch.maximum(local, _local(g).abs().max().to(dtype))
        dist.all_reduce(local, op=dist.ReduceOp.MAX, group=mesh_group(mesh))
        total = local
    else:
        local = torch.zeros((), dtype=dtype, device=device)
        for g in grads:
            lg = _local(g)
            if lg.numel():
                local = local + torch.linalg.vector_norm(lg.to(dtype), norm_type) ** norm_type / _copies(g, size)
        dist.all_reduce(local, group=mesh_group(mesh))
        total = local ** (1.0 / norm_type)
    if error_if_nonfinite and not torch.isfinite(total):
        raise RuntimeError(f"clip_grad_norm_: the total norm of order {norm_type} is non-finite")
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for g in grads:
        _local(g).mul_(coef.to(g.dtype))
    return total
