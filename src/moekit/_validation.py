"""Argument checks shared by the whole package: each error names the argument and what it allows.

Every constructor and config in moekit validates through these (one copy of each rule), before any
state is built. Numbers are checked for type (bools are refused where a number is meant), finiteness
and range, and integers for the int64 range the kernels use.
"""
from __future__ import annotations

import math
from typing import Any, Iterable

#: the largest integer a count or capacity may take (int64 kernels)
MAX_INT = 2 ** 62


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def positive_int(name: str, value: object) -> int:
    """``value`` if it is an int in [1, 2**62] (bools refused); ValueError naming ``name`` otherwise."""
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_INT:
        raise ValueError(f"{name}: must be a positive int (at most 2**62), got {value!r}")
    return value


def non_negative_int(name: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_INT:
        raise ValueError(f"{name}: must be a non-negative int, got {value!r}")
    return value


def int_in(name: str, value: object, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ValueError(f"{name}: must be an int in [{low}, {high}], got {value!r}")
    return value


def positive_number(name: str, value: object) -> float:
    """A finite number > 0 (NaN and ±inf refused)."""
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}: must be a finite positive number, got {value!r}")
    return float(value)


def non_negative_number(name: str, value: object) -> float:
    """A finite number ≥ 0 (NaN and ±inf refused)."""
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name}: must be a finite non-negative number, got {value!r}")
    return float(value)


def finite_number(name: str, value: object) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{name}: must be a finite number, got {value!r}")
    return float(value)


def number_in(name: str, value: object, low: float, high: float, *, high_open: bool = False) -> float:
    """A finite number in [low, high] (or [low, high) with ``high_open``)."""
    ok = _is_number(value) and math.isfinite(value) and low <= value and (value < high if high_open else value <= high)
    if not ok:
        raise ValueError(f"{name}: must be a number in [{low:g}, {high:g}{')' if high_open else ']'}, got {value!r}")
    return float(value)


def flag(name: str, value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be a bool, got {value!r}")
    return value


def choice(name: str, value: object, allowed: Iterable[Any]) -> Any:
    allowed = list(allowed)
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value


def optional(check, name: str, value: object, *args: Any) -> Any:
    """``None`` or ``check(name, value, *args)``."""
    return None if value is None else check(name, value, *args)
