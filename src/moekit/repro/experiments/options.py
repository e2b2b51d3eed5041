"""Typed experiment options: one dataclass declares the flags, their help (with defaults) and their checks.

An experiment's options are a dataclass whose fields are declared with :func:`option`::

    @dataclass(frozen=True)
    class Config:
        epochs: int = option(30, "training epochs", ge=1, quick=5)
        lr: float = option(0.1, "SGD learning rate", gt=0)
        gate: Literal["logit", "softmax"] = option("logit", "MoE gate")
        experts: tuple[int, ...] = option((4, 8), "expert counts", ge=1, nonempty=True)

        def check(self) -> None:              # optional: checks that involve several options
            if self.top_k > self.experts:
                raise OptionError("--top-k", f"must be <= --experts ({self.experts}), got {self.top_k}")

From that one declaration :func:`add_flags` builds the command-line flags (``--epochs``, ``--lr``, ...;
help shows the default and the quick-mode value), :func:`config_from_namespace` turns parsed flags into
a validated config, and :func:`validate` checks a config made in Python. Every error is an
:class:`OptionError` whose message starts with the flag it is about.

Supported field types: ``int``, ``float``, ``str``, ``bool``, ``Literal[...]`` (choices), ``X | None``
(``None`` = "automatic", described in the help) and ``tuple[int, ...]`` / ``tuple[float, ...]`` (given
as ``--flag 1 2 4`` or ``--flag 1,2,4``; ``--flag ''`` is the empty tuple). Floats must be finite unless
the field says ``finite=False``.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from typing import Any, Literal

_MISSING = dataclasses.MISSING


class OptionError(ValueError):
    """A bad option value; the message starts with the flag (``--lr: must be > 0, got nan``)."""

    def __init__(self, flag: str, message: str):
        self.flag = flag
        super().__init__(f"{flag}: {message}")


def option(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
           le: float | None = None, lt: float | None = None, finite: bool = True, nonempty: bool = False,
           quick: Any = _MISSING, flag: str | None = None, metavar: str | None = None) -> Any:
    """A config field: its default, its help text and its checks.

    ``ge``/``gt``/``le``/``lt`` bound numbers (every element of a tuple); ``finite`` refuses NaN/inf;
    ``nonempty`` refuses an empty tuple; ``quick`` is the value ``--quick`` uses when the flag is not
    given; ``flag`` overrides the flag name (default ``--`` + the field name with ``-`` for ``_``).
    """
    meta = dict(help=help, ge=ge, gt=gt, le=le, lt=lt, finite=finite, nonempty=nonempty, quick=quick, flag=flag,
                metavar=metavar)
    return dataclasses.field(default=default, metadata={"moekit_option": meta})


# ---------------------------------------------------------------------------------------------------
# field introspection
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Field:
    name: str
    flag: str
    kind: str                 # "int" | "float" | "str" | "bool" | "choice" | "int_tuple" | "float_tuple"
    optional: bool            # X | None
    choices: tuple[Any, ...]
    default: Any
    meta: dict[str, Any]


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported option type {tp!r}")
    return tp, False


def _fields(config_cls: type) -> list[_Field]:
    if not dataclasses.is_dataclass(config_cls):
        raise TypeError(f"config: expected a dataclass, got {config_cls!r}")
    hints = typing.get_type_hints(config_cls, include_extras=False)
    out = []
    for f in dataclasses.fields(config_cls):
        meta = f.metadata.get("moekit_option")
        if meta is None:
            raise TypeError(f"{config_cls.__name__}.{f.name}: declare config fields with option(...)")
        tp, optional = _unwrap_optional(hints[f.name])
        choices: tuple[Any, ...] = ()
        if typing.get_origin(tp) is Literal:
            kind, choices = "choice", typing.get_args(tp)
        elif tp is bool:
            kind = "bool"
        elif tp is int:
            kind = "int"
        elif tp is float:
            kind = "float"
        elif tp is str:
            kind = "str"
        elif typing.get_origin(tp) is tuple and typing.get_args(tp)[1:] == (Ellipsis,) \
                and typing.get_args(tp)[0] in (int, float):
            kind = "int_tuple" if typing.get_args(tp)[0] is int else "float_tuple"
        else:
            raise TypeError(f"{config_cls.__name__}.{f.name}: unsupported option type {hints[f.name]!r}")
        if kind == "bool" and optional:
            raise TypeError(f"{config_cls.__name__}.{f.name}: a bool option cannot be optional")
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        out.append(_Field(f.name, flag, kind, optional, choices, f.default, meta))
    return out


def flag_of(config_cls: type, name: str) -> str:
    """The command-line flag of field ``name`` (``"--batch-size"`` for ``batch_size``)."""
    for f in _fields(config_cls):
        if f.name == name:
            return f.flag
    raise KeyError(f"{config_cls.__name__} has no option {name!r}")


def _show(v: Any) -> str:
    if isinstance(v, tuple):
        return ",".join(_show(x) for x in v) if v else "''"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


# ---------------------------------------------------------------------------------------------------
# parsing
# ---------------------------------------------------------------------------------------------------

def _scalar(kind: str, flag: str, text: str) -> Any:
    conv = int if kind in ("int", "int_tuple") else float
    try:
        return conv(text)
    except ValueError:
        what = "an integer" if conv is int else "a number"
        raise OptionError(flag, f"expected {what}, got {text!r}") from None


def _parse_text(f: _Field, value: Any) -> Any:
    """A value as given on the command line (a string, or a list of strings for tuples) -> typed."""
    if f.kind in ("int_tuple", "float_tuple"):
        parts = value if isinstance(value, list) else [value]
        tokens = [t.strip() for p in parts for t in str(p).split(",") if t.strip()]
        return tuple(_scalar(f.kind, f.flag, t) for t in tokens)
    if f.kind in ("int", "float"):
        return _scalar(f.kind, f.flag, value)
    return value


def _check_number(f: _Field, v: Any) -> None:
    m = f.meta
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise OptionError(f.flag, f"expected a number, got {v!r}")
    if f.kind in ("int", "int_tuple") and not isinstance(v, int):
        raise OptionError(f.flag, f"expected an integer, got {v!r}")
    if m["finite"] and not math.isfinite(v):
        raise OptionError(f.flag, f"must be a finite number, got {v!r}")
    if math.isnan(v):
        raise OptionError(f.flag, f"must be a number, got {v!r}")
    for key, ok, word in (("ge", lambda a, b: a >= b, ">="), ("gt", lambda a, b: a > b, ">"),
                          ("le", lambda a, b: a <= b, "<="), ("lt", lambda a, b: a < b, "<")):
        bound = m[key]
        if bound is not None and not ok(v, bound):
            raise OptionError(f.flag, f"must be {word} {_show(bound)}, got {_show(v)}")


def _check_field(f: _Field, v: Any) -> None:
    if v is None:
        if not f.optional:
            raise OptionError(f.flag, "a value is required")
        return
    if f.kind == "bool":
        if not isinstance(v, bool):
            raise OptionError(f.flag, f"expected true or false, got {v!r}")
    elif f.kind == "choice":
        if v not in f.choices:
            raise OptionError(f.flag, f"expected one of {', '.join(map(str, f.choices))}, got {v!r}")
    elif f.kind == "str":
        if not isinstance(v, str):
            raise OptionError(f.flag, f"expected a string, got {v!r}")
    elif f.kind in ("int", "float"):
        _check_number(f, v)
    else:
        if not isinstance(v, tuple):
            raise OptionError(f.flag, f"expected a tuple of numbers, got {v!r}")
        if f.meta["nonempty"] and not v:
            raise OptionError(f.flag, "expected at least one value")
        if len(set(v)) != len(v):
            raise OptionError(f.flag, f"values must be distinct, got {_show(v)}")
        for x in v:
            _check_number(f, x)


def validate(config: Any) -> Any:
    """Check every field of ``config`` and then its ``check()`` method; returns ``config``.

    Raises :class:`OptionError` naming the flag. ``int`` values are accepted for ``float`` fields.
    """
    for f in _fields(type(config)):
        _check_field(f, getattr(config, f.name))
    check = getattr(config, "check", None)
    if callable(check):
        check()
    return config


def add_flags(parser: argparse.ArgumentParser | Any, config_cls: type) -> None:
    """Add one flag per field of ``config_cls`` to ``parser`` (values stay strings until
    :func:`config_from_namespace`; a flag that is not given is absent from the namespace)."""
    for f in _fields(config_cls):
        help_text = f.meta["help"].rstrip(".")
        default = "none" if f.default is None else _show(f.default)
        extra = f" (default {default}"
        if f.meta["quick"] is not _MISSING:
            extra += f"; --quick: {_show(f.meta['quick'])}"
        extra += ")"
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=(help_text + extra).replace("%", "%%"))
        if f.kind == "bool":
            kwargs["action"] = argparse.BooleanOptionalAction
        elif f.kind == "choice":
            kwargs["choices"] = list(f.choices)
            kwargs["type"] = type(f.choices[0]) if f.choices else str
        elif f.kind in ("int_tuple", "float_tuple"):
            kwargs["nargs"] = "+"
            kwargs["metavar"] = f.meta["metavar"] or ("N" if f.kind == "int_tuple" else "X")
        else:
            kwargs["metavar"] = f.meta["metavar"] or {"int": "N", "float": "X", "str": "TEXT"}[f.kind]
        parser.add_argument(f.flag, **kwargs)


def config_from_namespace(config_cls: type, ns: argparse.Namespace | dict[str, Any] | None = None,
                          quick: bool = False) -> Any:
    """The validated config: flags given in ``ns`` (strings as parsed by :func:`add_flags`, or typed
    values), else the quick value when ``quick``, else the default. Unknown names in ``ns`` are ignored."""
    given = vars(ns) if isinstance(ns, argparse.Namespace) else dict(ns or {})
    values = {}
    for f in _fields(config_cls):
        if f.name in given:
            v = given[f.name]
            values[f.name] = _parse_text(f, v) if isinstance(v, (str, list)) and f.kind != "str" \
                and f.kind != "choice" else v
        elif quick and f.meta["quick"] is not _MISSING:
            values[f.name] = f.meta["quick"]
        else:
            values[f.name] = f.default
    for f in _fields(config_cls):   # check field by field before constructing (a __post_init__ may rely on it)
        _check_field(f, values[f.name])
    return validate(config_cls(**values))


def config_dict(config: Any) -> dict[str, Any]:
    """The config as a plain dict (tuples as lists), for results.json."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}


__all__ = ["OptionError", "add_flags", "config_dict", "config_from_namespace", "flag_of", "option", "validate"]
