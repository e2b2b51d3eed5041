"""Router base class: a linear gate in the routing dtype, the balancing bookkeeping every router
shares, and the selection bias of aux-loss-free balancing.

Legend: T tokens, D model dim, E experts, K experts per token, G routing groups.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .. import _validation as V
from .. import losses as L
from ..config import Recorded, RouterConfig
from .plans import DECISION_KINDS, RoutingPlan, plan_kind

LOSS_WEIGHTS = ("w_importance", "w_load", "w_switch", "w_z")
#: ``"float32"``: the gate GEMM in the routing dtype (exact routing decisions, the default);
#: ``"compute"``: in the experts' compute dtype (bf16/fp16 input or autocast) with float32 accumulation
#: and output — tensor-core speed, decisions may differ where two logits are within bf16 rounding
GATE_PRECISIONS = ("float32", "compute")


def check_top_k(top_k: int, num_experts: int) -> None:
    V.positive_int("num_experts", num_experts)
    V.int_in("top_k", top_k, 1, num_experts)


class Router(Recorded, nn.Module):
    """Base router: a linear gate ``logits = x W`` in float32 (float64 for float64 input) plus the
    balancing bookkeeping every router shares.

    The contract a router (built-in, subclass or a new file registered in ``ROUTERS``) follows:
      * class attributes: ``kind`` — the kind of decision it makes (``"token_choice"``,
        ``"expert_choice"`` or ``"soft"``); ``supports_capacity`` — whether a capacity limit applies;
        ``default_weights`` — its family's loss coefficients; ``has_load_loss``;
      * :meth:`route` ``(x_TD, *, mask_T=None, generator=None, group_size=None) -> RoutingPlan``:
        the decision only, as a plan of the router's kind (:mod:`moekit.routing.plans`). Masked
        tokens (``mask_T`` False) must not be selected by expert-choice routers; token-choice routers
        may select them (the plan drops those assignments); ``generator`` seeds the router's noise.
    :meth:`forward` adds the plan's statistics (per routing group of ``group_size`` tokens),
    optionally sums them over a process group, and forms the weighted aux loss from them
    (:meth:`balance_losses`). :meth:`config` is the router's complete configuration (its registry
    name and every constructor option). Loss coefficients are uniform keywords across routers: ``w_importance``,
    ``w_load``, ``w_switch``, ``w_z``; a coefficient of 0 leaves that loss out of the aux loss (it is
    still reported, unweighted, in metrics).

    ``check_finite`` (default on) asserts that the logits are finite without synchronising with the
    host (``torch._assert_async``: a device-side assert on GPU, compiled into the graph under
    ``torch.compile``); routing never continues on NaN/Inf logits.
    """

    kind: str = "token_choice"
    supports_capacity: bool = True
    #: default loss coefficients of this router family (overridable per instance)
    default_weights: dict[str, float] = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 0.0, "w_z": 0.0}
    #: whether this family defines a load loss (``w_load > 0`` is refused otherwise)
    has_load_loss: bool = False
    #: whether the router's logits come from the (E, D) linear ``gate`` the base class creates
    linear_gate: bool = True
    #: whether, without a ``group_size``, the tokens of one sequence (``x.shape[-2]``) form a routing group
    groups_by_sequence: bool = False

    config_exclude = frozenset({"dim", "num_experts", "top_k", "zero_init", "check_finite"})

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, zero_init: bool = False,
                 check_finite: bool = True, w_importance: float | None = None, w_load: float | None = None,
                 w_switch: float | None = None, w_z: float | None = None, gate_precision: str = "float32"):
        super().__init__()
        V.positive_int("dim", dim)
        check_top_k(top_k, num_experts)
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"{type(self).__name__}.kind: expected one of {DECISION_KINDS}, got {self.kind!r}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.check_finite = V.flag("check_finite", check_finite)
        self.gate_precision = V.choice("gate_precision", gate_precision, GATE_PRECISIONS)
        V.flag("zero_init", zero_init)
        given = {"w_importance": w_importance, "w_load": w_load, "w_switch": w_switch, "w_z": w_z}
        for name, value in given.items():
            setattr(self, name, V.non_negative_number(name, self.default_weights[name] if value is None else value))
        if self.w_load > 0 and not self.has_load_loss:
            raise ValueError(f"w_load: {type(self).__name__} has no load loss; use w_load=0 "
                             "(routers with one: noisy_topk, topk with noise_std > 0)")
        if not self.linear_gate:
            return
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if zero_init:
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=dim ** -0.5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"

    def config(self) -> RouterConfig:
        """Registry name (``"module:QualName"`` for an unregistered class), ``top_k`` and every
        constructor option that changes the output, the loss coefficients resolved to their values."""
        from . import ROUTERS
        name = next((n for n, cls in ROUTERS.items() if cls is type(self)),
                    f"{type(self).__module__}:{type(self).__qualname__}")
        options = dict(self.init_args)
        options.update({w: getattr(self, w) for w in LOSS_WEIGHTS})
        return RouterConfig(name, self.__dict__.get("_init_args", {}).get("top_k"), options)

    @staticmethod
    def routing_dtype(x: Tensor) -> torch.dtype:
        """Routing runs in float32 (float64 for float64 input): it is precision-sensitive."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def linear(self, x_TD: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x W^T (+ b)`` returned in the routing dtype, outside any autocast region. With
        ``gate_precision="compute"`` the GEMM itself runs in the compute dtype (autocast's, or a
        16-bit input's) and accumulates in float32; otherwise in float32 (which follows
        ``torch.set_float32_matmul_precision``: TF32 on GPUs where the user allows it)."""
        dtype = self.routing_dtype(x_TD)
        gemm = dtype
        if self.gate_precision == "compute":
            device = x_TD.device.type
            gemm = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_TD.dtype
        with torch.autocast(x_TD.device.type, enabled=False):
            if gemm in (torch.bfloat16, torch.float16) and dtype == torch.float32:
                if x_TD.device.type == "cuda":      # float32 accumulation *and* output (no bf16 rounding)
                    out = torch.mm(x_TD.to(gemm), weight.to(gemm).t(), out_dtype=dtype)
                else:
                    out = (x_TD.to(gemm) @ weight.to(gemm).t()).to(dtype)
            else:
                out = x_TD.to(dtype) @ weight.to(dtype).t()
            if bias is not None:
                out = out + bias.to(dtype)
        return out

    def assert_finite(self, logits: Tensor) -> Tensor:
        if self.check_finite:
            torch._assert_async(torch.isfinite(logits).all(),
                                f"{type(self).__name__}: router logits contain NaN/Inf; refusing to route")
        return logits

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in the routing dtype whatever the input dtype or autocast state."""
        return self.assert_finite(self.linear(x_TD, self.gate.weight))

    @staticmethod
    def randn_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """Standard normal noise shaped like ``t``, from ``generator`` when given."""
        if generator is None:
            return torch.randn_like(t)
        return torch.randn(t.shape, generator=generator, device=t.device, dtype=t.dtype)

    def forward(self, x_TD: Tensor, mask_T: Tensor | None = None, *, generator: torch.Generator | None = None,
                group_size: int | None = None, stats_group=None) -> RoutingPlan:
        """Route T tokens. ``mask_T`` (T,) bool: True = real token; ``group_size``: routing groups of
        that many consecutive tokens (statistics and losses per group, averaged over the groups that
        hold a real token); ``stats_group``: a process group to sum the statistics over before the
        losses are formed."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (T, {self.dim}), got {tuple(x_TD.shape)}")
        if mask_T is not None and (mask_T.shape != x_TD.shape[:1] or mask_T.dtype != torch.bool):
            raise ValueError(f"mask: expected a bool tensor of shape ({x_TD.shape[0]},), got "
                             f"{mask_T.dtype} {tuple(mask_T.shape)}")
        if group_size is not None and x_TD.shape[0] % group_size:
            raise ValueError(f"group_size: {x_TD.shape[0]} tokens do not split into groups of {group_size}")
        plan = self.route(x_TD, mask_T=mask_T, generator=generator, group_size=group_size)
        if plan_kind(plan) != self.kind:
            raise ValueError(f"{type(self).__name__}: declared kind {self.kind!r} but returned a "
                             f"{plan_kind(plan)!r} plan")
        stats = plan.statistics(mask_T, group_size)
        if stats_group is not None:
            stats = stats.all_reduce(stats_group)
        plan.stats = stats
        plan.aux_loss, losses = self.balance_losses(stats)
        plan.metrics.update(losses)
        return plan

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> RoutingPlan:  # pragma: no cover - abstract
        raise NotImplementedError

    def balance_losses(self, stats: RoutingStats) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted aux loss and the unweighted parts (detached) from routing statistics."""
        aux = torch.zeros((), device=stats.counts.device, dtype=stats.counts.dtype)
        parts: dict[str, tuple[float, Tensor | None]] = {
            # E·Σ f_i P_i is identically 1 when every token uses every expert: only report it for k < E.
            "switch_loss": (self.w_switch, L.switch_loss_from_stats(stats)
                            if self.kind == "token_choice" and stats.top_k < stats.num_experts else None),
            "z_loss": (self.w_z, L.z_loss_from_stats(stats)),
            "importance_loss": (self.w_importance, L.importance_loss_from_stats(stats)),
            "load_loss": (self.w_load, L.load_loss_from_stats(stats)),
        }
        metrics: dict[str, Tensor] = {}
        for name, (w, value) in parts.items():
            if value is None:
                continue
            metrics[name] = value.detach()
            if w > 0:
                aux = aux + w * value
        return aux, metrics
