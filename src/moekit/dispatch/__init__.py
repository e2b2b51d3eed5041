"""Token dispatch: the dispatcher interface, the local (one-process) and reference dispatchers, and
capacity limits."""
from .base import Assignments, TokenDispatcher
from .capacity import capacity_keep, capacity_mask, expert_capacity
from .local import LocalDispatcher, expert_counts
from .reference import ReferenceDispatcher, combine_matrix, reference_dispatch
from .sorted import sorted_dispatch

#: name -> dispatcher class, for ``MoE(dispatch=...)``
DISPATCHERS = {"sorted": LocalDispatcher, "reference": ReferenceDispatcher}

__all__ = ["Assignments", "DISPATCHERS", "LocalDispatcher", "ReferenceDispatcher", "TokenDispatcher",
           "capacity_keep", "capacity_mask", "combine_matrix", "expert_capacity", "expert_counts",
           "reference_dispatch", "sorted_dispatch"]
