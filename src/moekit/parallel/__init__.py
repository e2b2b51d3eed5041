"""Distributed MoE on torch.distributed: experts as DTensors on a named DeviceMesh (all-to-all dispatch
over its ``ep`` dimension), composed with FSDP2/DDP, the global gradient norm, DCP checkpoints."""
from .dispatcher import AllToAllDispatcher
from .expert_parallel import expert_parallel, expert_parameters, moe_layers, parallel_mesh, sync_gradients
from .fsdp import clip_grad_norm_, fully_shard_moe, replicate_moe
from .teardown import end_process, run_then_end

__all__ = ["AllToAllDispatcher", "clip_grad_norm_", "end_process", "expert_parallel", "expert_parameters", "fully_shard_moe",
           "moe_layers", "parallel_mesh", "replicate_moe", "run_then_end", "sync_gradients"]
