"""Token dispatch: the reference oracle, dropless sorted dispatch and capacity limits."""
from .capacity import capacity_mask, expert_capacity
from .reference import combine_matrix, reference_dispatch
from .sorted import sorted_dispatch

DISPATCHERS = {"sorted": sorted_dispatch, "reference": reference_dispatch}

__all__ = ["DISPATCHERS", "capacity_mask", "combine_matrix", "expert_capacity", "reference_dispatch",
           "sorted_dispatch"]
