"""Routing diagnostics and plots shared by every experiment.

``routing``: pure tensor functions (routing tables, dispatch entropy, load statistics).
``plots``:   matplotlib figures (imported lazily: matplotlib is an optional extra).
"""
from .monitor import RoutingMonitor
from .routing import dispatch_entropy, load_stats, routing_table

__all__ = ["RoutingMonitor", "dispatch_entropy", "load_stats", "routing_table"]
