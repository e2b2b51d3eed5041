"""Distributed MoE on torch.distributed: expert parallelism (all-to-all dispatch) × data parallelism."""
from .dispatcher import AllToAllDispatcher
from .expert_parallel import ExpertParallelInfo, expert_parallel, is_expert_parameter, sync_gradients

__all__ = ["AllToAllDispatcher", "ExpertParallelInfo", "expert_parallel", "is_expert_parameter", "sync_gradients"]
