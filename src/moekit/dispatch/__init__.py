"""Token dispatch: the dispatcher interface, the local (one-process) and reference dispatchers, the
atomics-free permutation pieces, and capacity policies."""
from .base import Assignments, TokenDispatcher
from .capacity import CapacityPolicy, capacity_keep, capacity_mask, expert_capacity
from .local import LocalDispatcher, expert_counts
from .permute import combine_grid, counts_from_sorted, gather_tokens, invert_permutation, permute_rows
from .reference import ReferenceDispatcher, combine_matrix

#: name -> dispatcher class, for ``MoE(dispatch=...)``
DISPATCHERS = {"sorted": LocalDispatcher, "reference": ReferenceDispatcher}

__all__ = ["Assignments", "CapacityPolicy", "DISPATCHERS", "LocalDispatcher", "ReferenceDispatcher", "TokenDispatcher",
           "capacity_keep", "capacity_mask", "combine_grid", "combine_matrix", "counts_from_sorted", "expert_capacity",
           "expert_counts", "gather_tokens", "invert_permutation", "permute_rows"]
