"""One configuration object for an MoE layer: what it is built from, stored in checkpoints and compared.

``MoEConfig`` nests one config per piece of the layer — ``RouterConfig``, ``ExpertsConfig``,
``CapacityConfig``, ``SharedConfig`` — each validating its values when it is made (positive, finite,
in range, no overflow), so a bad value fails before any module exists and names its field.

    cfg = MoEConfig(dim=512, hidden_dim=1024, num_experts=64,
                    router=RouterConfig("topk", top_k=2, options={"w_switch": 1e-2}),
                    capacity=CapacityConfig(factor=1.25))
    layer = moekit.MoE.from_config(cfg)
    layer.config == cfg                          # the layer reports the config of its built pieces
    first_difference(cfg.to_dict(), other.to_dict())   # 'router.options.w_switch', or None

``layer.config`` is assembled from the built pieces (router, expert bank, capacity policy, shared
experts), so it is the complete configuration of what the layer computes, also for pieces built by
hand: every router and stacked expert bank records the arguments it was constructed with
(:class:`Recorded`).
"""
from __future__ import annotations

import functools
import inspect
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Mapping

from . import _validation as V

FORMAT = "moekit-moe-config-1"


class Recorded:
    """Mixin: an instance remembers the arguments its outermost ``__init__`` was called with (defaults
    filled in, ``**kwargs`` flattened) as ``self.init_args``; names in the class's ``config_exclude``
    (options that do not change the output, such as initialisation choices) are left out."""

    config_exclude: frozenset[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None or getattr(init, "_records_args", False):
            return
        sig = inspect.signature(init)

        @functools.wraps(init)
        def recording_init(self, *args, **kw):
            if "_init_args" not in self.__dict__:          # the outermost (most derived) constructor
                bound = sig.bind(self, *args, **kw)
                bound.apply_defaults()
                recorded: dict[str, Any] = {}
                for name, value in list(bound.arguments.items())[1:]:
                    param = sig.parameters[name]
                    if param.kind is param.VAR_KEYWORD:
                        recorded.update(value)
                    elif param.kind is not param.VAR_POSITIONAL:
                        recorded[name] = value
                object.__setattr__(self, "_init_args", recorded)
            init(self, *args, **kw)

        recording_init._records_args = True
        cls.__init__ = recording_init

    @property
    def init_args(self) -> dict[str, Any]:
        exclude = type(self).config_exclude
        return {k: v for k, v in self.__dict__.get("_init_args", {}).items() if k not in exclude}


def _plain(value: Any, where: str) -> Any:
    """JSON-able copy of a config value (refuses tensors, modules and other objects)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _plain(v, f"{where}.{k}") for k, v in value.items()}
    raise TypeError(f"{where}: a configuration value must be a number, string, bool, None or a list/dict of "
                    f"them, got {type(value).__name__}")


@dataclass(frozen=True)
class RouterConfig:
    """A router by registry name (:data:`moekit.routing.ROUTERS`) with its options (including the loss
    coefficients ``w_importance``, ``w_load``, ``w_switch``, ``w_z``). ``top_k=None``: the family's
    default. A router class that is not registered is named ``"module:QualName"`` (compared, not built)."""
    name: str = "topk"
    top_k: int | None = None
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"router: expected a router name, got {self.name!r}")
        V.optional(V.positive_int, "top_k", self.top_k)
        object.__setattr__(self, "options", _plain(dict(self.options), "router_options"))


@dataclass(frozen=True)
class ExpertsConfig:
    """A stacked expert bank: ``kind`` ``"glu"`` or ``"mlp"`` with its options (``activation``,
    ``bias``, GLU ``alpha``/``limit``/``up_offset``), or ``"modules"`` (user modules: compared by class
    name only). ``gate_on_input``: the combine weight scales the expert's input instead of its output
    (Llama-4's experts, :func:`~moekit.experts.input_gated`)."""
    kind: str = "glu"
    options: Mapping[str, Any] = field(default_factory=dict)
    gate_on_input: bool = False

    def __post_init__(self):
        if not isinstance(self.kind, str) or not self.kind:
            raise ValueError(f"expert: expected an expert kind name, got {self.kind!r}")
        V.flag("gate_on_input", self.gate_on_input)
        object.__setattr__(self, "options", _plain(dict(self.options), "expert_options"))


@dataclass(frozen=True)
class CapacityConfig:
    """How many assignments each expert takes per routing group: ``factor`` c (a ratio:
    ``C = ceil(N·k·c/E)`` for N real tokens), or ``absolute`` C, or neither (dropless). ``multiple_of``
    rounds a ratio's C up; ``batch_priority`` serves tokens by descending top-1 gate (needs a capacity)."""
    factor: float | None = None
    absolute: int | None = None
    multiple_of: int = 1
    batch_priority: bool = False

    def __post_init__(self):
        V.optional(V.positive_number, "capacity_factor", self.factor)
        V.optional(V.positive_int, "capacity", self.absolute)
        V.positive_int("capacity_multiple_of", self.multiple_of)
        V.flag("batch_priority", self.batch_priority)
        if self.factor is not None and self.absolute is not None:
            raise ValueError("capacity: give either capacity (absolute) or capacity_factor (a ratio), not both")
        if self.batch_priority and self.dropless:
            raise ValueError("batch_priority: needs a capacity (capacity_factor or capacity)")
        if self.factor is not None:
            object.__setattr__(self, "factor", float(self.factor))

    @property
    def dropless(self) -> bool:
        return self.factor is None and self.absolute is None


@dataclass(frozen=True)
class SharedConfig:
    """``num_experts`` dense experts applied to every token (fused into one of ``num_experts ·
    hidden_dim`` units; ``hidden_dim=None``: the routed experts'), added to the output; ``gated``
    scales them by ``sigmoid(x w)`` with a learned (D,) ``w`` (Qwen2-MoE, Qwen3-Next)."""
    num_experts: int = 0
    hidden_dim: int | None = None
    gated: bool = False

    def __post_init__(self):
        V.non_negative_int("num_shared_experts", self.num_experts)
        V.optional(V.positive_int, "shared_hidden_dim", self.hidden_dim)
        V.flag("shared_gate", self.gated)
        if self.gated and self.num_experts == 0:
            raise ValueError("shared_gate: needs num_shared_experts > 0")


@dataclass(frozen=True)
class MoEConfig:
    """The complete configuration of an :class:`~moekit.MoE` layer (see the module docstring).

    ``group_size``: route in groups of this many consecutive tokens (capacity and balancing losses per
    group), ``"sequence"`` (one group per sequence, ``x.shape[-2]`` tokens) or None (one group)."""
    dim: int
    hidden_dim: int
    num_experts: int
    router: RouterConfig = field(default_factory=RouterConfig)
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    capacity: CapacityConfig = field(default_factory=CapacityConfig)
    shared: SharedConfig = field(default_factory=SharedConfig)
    group_size: int | str | None = None

    def __post_init__(self):
        V.positive_int("dim", self.dim)
        V.positive_int("hidden_dim", self.hidden_dim)
        V.positive_int("num_experts", self.num_experts)
        for name, cls in (("router", RouterConfig), ("experts", ExpertsConfig), ("capacity", CapacityConfig),
                          ("shared", SharedConfig)):
            if not isinstance(getattr(self, name), cls):
                raise TypeError(f"{name}: expected a {cls.__name__}, got {type(getattr(self, name)).__name__}")
        if self.group_size != "sequence":
            V.optional(V.positive_int, "group_size", self.group_size)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (``from_dict`` inverts it)."""
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "MoEConfig":
        if not isinstance(d, Mapping) or d.get("format", FORMAT) != FORMAT:
            raise ValueError(f"config: not a moekit MoE configuration ({FORMAT}): {d!r:.200}")
        nested = {"router": RouterConfig, "experts": ExpertsConfig, "capacity": CapacityConfig, "shared": SharedConfig}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known - {"format"})
        if unknown:
            raise ValueError(f"config: unknown field(s) {unknown}; valid: {sorted(known)}")
        kw = {k: (nested[k](**d[k]) if k in nested else d[k]) for k in known if k in d}
        return cls(**kw)


def first_difference(a: Any, b: Any, path: str = "") -> str | None:
    """The dotted path of the first field where two configuration dicts differ (``"router.options.score"``),
    ``path`` itself (or ``"<root>"``) when two values differ, None when they are equal."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            sub = f"{path}.{key}" if path else str(key)
            if key not in a or key not in b:
                return sub
            found = first_difference(a[key], b[key], sub)
            if found is not None:
                return found
        return None
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if len(a) != len(b):
            return path or "<root>"
        for i, (x, y) in enumerate(zip(a, b)):
            found = first_difference(x, y, f"{path}[{i}]")
            if found is not None:
                return found
        return None
    if type(a) is not type(b) and not (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                       and not isinstance(a, bool) and not isinstance(b, bool)):
        return path or "<root>"
    return None if a == b else (path or "<root>")
