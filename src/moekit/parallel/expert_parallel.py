"""Expert parallelism × data parallelism for every :class:`~moekit.MoE` layer of a model.

Legend: E experts per layer, P expert-parallel size, El = E/P local experts, W world size = dp × P.

Semantics (what :func:`expert_parallel` and :func:`sync_gradients` guarantee). Every rank builds the
same full model (same seed), then calls ``expert_parallel(model, mesh)``: each MoE layer keeps its
rank's slice of the experts and dispatches with all-to-all over the ``ep`` dimension; everything else
is replicated. Each rank runs its own slice of the global batch (equal sizes) and its own mean loss
``task_loss + aux_loss``; then ``sync_gradients(model)`` makes every gradient equal the single-process
gradient of the *mean* loss over the global batch:

* replicated parameters (routers, shared experts, everything outside the MoE experts): sum over all W
  ranks, divided by W;
* expert parameters: the all-to-all backward has already summed the gradients of every ep rank's
  tokens into the owner; they are summed over the ``dp`` replicas and divided by W.

With ``global_balance=True`` (default) the routing statistics are summed over all W ranks before the
balancing losses are formed (global-batch balancing: every rank sees the aux loss of the whole batch,
and after ``sync_gradients`` its gradient is the single-process one). The sigmoid router's
aux-loss-free bias update sums the per-expert counts over all ranks, so every rank keeps the same bias.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..experts import ExpertBank, ModuleExperts
from ..layers.moe import MoE
from .dispatcher import AllToAllDispatcher


@dataclass
class ExpertParallelInfo:
    """Where a layer's experts live: this rank holds experts ``[rank·El, (rank+1)·El)`` of ``num_experts``."""
    ep_group: object
    ep_rank: int
    ep_size: int
    dp_group: object | None
    world_group: object
    world_size: int
    num_experts: int

    @property
    def num_local(self) -> int:
        return self.num_experts // self.ep_size

    @property
    def first(self) -> int:
        return self.ep_rank * self.num_local


def _groups(mesh) -> tuple[object, object | None]:
    names = mesh.mesh_dim_names
    if mesh.ndim == 1:
        return mesh.get_group(0), None
    if mesh.ndim == 2 and names is not None and tuple(names) == ("dp", "ep"):
        return mesh.get_group("ep"), mesh.get_group("dp")
    raise ValueError(f"mesh: expected a 1-D mesh (expert parallel over all its ranks) or a 2-D mesh with dim "
                     f"names ('dp', 'ep'); got {mesh.ndim}-D with names {names}")


def _slice_bank(bank: ExpertBank, first: int, count: int) -> None:
    """Keep experts [first, first + count) of a bank, in place."""
    E = bank.num_experts
    if isinstance(bank, ModuleExperts):
        bank.experts = nn.ModuleList(list(bank.experts)[first:first + count])
    else:
        for name, p in list(bank.named_parameters(recurse=False)):
            if p.shape[0] != E:
                raise ValueError(f"expert: parameter {name!r} of {type(bank).__name__} has leading size "
                                 f"{p.shape[0]}, not num_experts={E}; cannot shard it")
            setattr(bank, name, nn.Parameter(p.detach()[first:first + count].clone(), requires_grad=p.requires_grad))
    bank.num_experts = count


def expert_parallel(module: nn.Module, mesh, *, global_balance: bool = True) -> nn.Module:
    """Convert every :class:`~moekit.MoE` inside ``module`` to expert parallelism over ``mesh``, in place.

    ``mesh``: a ``torch.distributed.device_mesh.DeviceMesh`` — 1-D: expert parallel over all its ranks;
    2-D with dim names ``("dp", "ep")``: experts sharded over ``ep``, replicated over ``dp``. The mesh
    must span the whole default process group. Each layer's E must be divisible by the ep size.
    """
    if not dist.is_initialized():
        raise RuntimeError("expert_parallel: torch.distributed is not initialised (init_process_group first)")
    ep_group, dp_group = _groups(mesh)
    world = dist.get_world_size()
    if mesh.size() != world:
        raise ValueError(f"mesh: spans {mesh.size()} ranks but the process group has {world}; use a mesh over "
                         "all ranks")
    ep_size, ep_rank = dist.get_world_size(ep_group), dist.get_rank(ep_group)
    layers = [m for m in module.modules() if isinstance(m, MoE)]
    for layer in layers:                              # check every layer before changing any
        if layer.num_experts % ep_size:
            raise ValueError(f"num_experts: {layer.num_experts} experts do not split over the expert-parallel "
                             f"size {ep_size}; num_experts must be divisible by it")
        if getattr(layer, "ep", None) is not None:
            raise ValueError("module: already expert-parallel")
    for layer in layers:
        info = ExpertParallelInfo(ep_group, ep_rank, ep_size, dp_group, dist.group.WORLD, world, layer.num_experts)
        _slice_bank(layer.experts, info.first, info.num_local)
        layer.dispatcher = AllToAllDispatcher(ep_group, layer.num_experts)
        layer.ep = info
        if global_balance:
            layer.balance_group = dist.group.WORLD
        if hasattr(layer.router, "bias_group"):
            layer.router.bias_group = dist.group.WORLD
    return module


def is_expert_parameter(module: nn.Module) -> dict[int, ExpertParallelInfo]:
    """``{id(param): info}`` for the expert parameters of expert-parallel MoE layers."""
    out = {}
    for m in module.modules():
        if isinstance(m, MoE) and getattr(m, "ep", None) is not None:
            for p in m.experts.parameters():
                out[id(p)] = m.ep
    return out


@torch.no_grad()
def sync_gradients(module: nn.Module) -> None:
    """Average gradients so each equals the single-process gradient of the global-batch mean loss
    (see the module docstring). Call after ``backward`` and before the optimizer step, on every rank."""
    experts = is_expert_parameter(module)
    world = dist.get_world_size()
    for p in module.parameters():
        if not p.requires_grad:
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        info = experts.get(id(p))
        if info is None:
            dist.all_reduce(p.grad, group=dist.group.WORLD)
        elif info.dp_group is not None and dist.get_world_size(info.dp_group) > 1:
            dist.all_reduce(p.grad, group=info.dp_group)
        p.grad.div_(world)
