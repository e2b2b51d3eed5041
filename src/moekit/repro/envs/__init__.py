"""Environments for the reproductions: a procedural grid-navigation world (``gridnav``)."""
from .gridnav import (CATEGORIES, NUM_ACTIONS, STOP, VIEWS, VIEW_FAMILY, GridMap, NavWorld, generate_map,
                      geodesic_distance, in_sight_oracle, make_world, random_walk_policy)

__all__ = ["CATEGORIES", "GridMap", "NUM_ACTIONS", "NavWorld", "STOP", "VIEWS", "VIEW_FAMILY", "generate_map",
           "geodesic_distance", "in_sight_oracle", "make_world", "random_walk_policy"]
