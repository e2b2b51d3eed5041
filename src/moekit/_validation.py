"""Argument checks shared by the layers and models: errors name the argument and what it allows."""
from __future__ import annotations


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int ≥ 1 (bools refused); ValueError naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name}: must be a positive int, got {value!r}")
    return value
