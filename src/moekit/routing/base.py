"""Router base class and the routing decision every router returns.

Legend: T tokens, D model dim, E experts, K experts per token, A flat (token, expert) assignments,
G routing groups, N tokens per group, S slots per expert.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import losses as L
from ..stats import RoutingStats, group_sum


#: the kinds of routing decision a layer can execute
DECISION_KINDS = ("token_choice", "expert_choice", "soft")


@dataclass
class RoutingDecision:
    """What a router decided for a batch of T tokens.

    ``kind`` says how to execute it (declared by the router class, never inferred from a class name):
      * ``"token_choice"`` — each token picks K experts: ``expert_ids``/``weights`` (T, K);
      * ``"expert_choice"`` — each expert picks its tokens: the flat assignments ``assign_*`` (A entries);
      * ``"soft"`` — every expert slot is a mixture of tokens: ``slot_dispatch``/``slot_combine``.
    :meth:`assignments` returns the flat (token, expert, weight) form for the first two kinds.
    """
    expert_ids: Tensor                 # (T, K) long: chosen experts, best first
    weights: Tensor                    # (T, K) combine weights
    logits: Tensor                     # (T, E) clean router logits (float32, float64 for float64 input)
    probs: Tensor                      # (T, E) router's distribution over all experts (rows sum to 1)
    kind: str = "token_choice"
    noisy_logits: Tensor | None = None  # (T, E) logits with training noise, when noise is used
    noise_std: Tensor | float | None = None  # (T, E) or scalar noise std, when noise is used
    aux_loss: Tensor | None = None     # weighted scalar (set by Router.forward)
    metrics: dict[str, Tensor] = field(default_factory=dict)  # unweighted losses, detached
    assign_token: Tensor | None = None   # (A,) long, expert-choice routers
    assign_expert: Tensor | None = None  # (A,) long
    assign_weight: Tensor | None = None  # (A,)
    importance_gates: Tensor | None = None  # (T, E) the gates whose column sums are "importance"
    load: Tensor | None = None         # (T, E) per-token smooth load estimate, routers that have one
    priority: Tensor | None = None     # (T,) Batch Priority Routing key: the raw top-1 gate
    slot_dispatch: Tensor | None = None  # (G, N, E·S) soft routing: token -> slot weights (sum 1 over N)
    slot_combine: Tensor | None = None   # (G, N, E·S) soft routing: slot -> token weights (sum 1 over slots)
    stats: RoutingStats | None = None  # per-expert sums the losses are formed from (set by Router.forward)

    def __post_init__(self):
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"kind: expected one of {DECISION_KINDS}, got {self.kind!r}")

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def token_choice(self) -> bool:
        return self.kind == "token_choice"

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat ``(token_A, expert_A, weight_A)``; for top-k routers in slot-major order
        (all first choices, then all second choices, ...), which is the order capacity uses."""
        if self.kind == "expert_choice":
            return self.assign_token, self.assign_expert, self.assign_weight
        if self.kind == "soft":
            raise ValueError("assignments: a soft routing decision has slots, not (token, expert) assignments")
        T, K = self.expert_ids.shape
        token_KT = torch.arange(T, device=self.expert_ids.device).expand(K, T)
        return token_KT.reshape(-1), self.expert_ids.t().reshape(-1), self.weights.t().reshape(-1)

    def gates(self) -> Tensor:
        """Dense (T, E) combine-weight matrix (zeros for unselected experts)."""
        if self.kind == "soft":
            return self.weights
        if self.importance_gates is not None and self.kind == "token_choice":
            return self.importance_gates
        token_A, expert_A, weight_A = self.assignments()
        T = self.logits.shape[0]
        out_TE = torch.zeros(T, self.num_experts, dtype=weight_A.dtype, device=weight_A.device)
        return out_TE.index_put((token_A, expert_A), weight_A, accumulate=True)

    def selections(self) -> Tensor:
        """(T, E) how many times each token was selected for each expert (soft: its combine weight)."""
        T, E = self.logits.shape
        if self.kind == "soft":
            return self.weights
        if self.kind == "expert_choice":
            token_A, expert_A, _ = self.assignments()
            out_TE = torch.zeros(T, E, dtype=self.logits.dtype, device=self.logits.device)
            return out_TE.index_put((token_A, expert_A), torch.ones_like(token_A, dtype=out_TE.dtype),
                                    accumulate=True)
        ones_TK = torch.ones(self.expert_ids.shape, dtype=self.logits.dtype, device=self.logits.device)
        return torch.zeros(T, E, dtype=self.logits.dtype, device=self.logits.device).scatter_add(
            1, self.expert_ids, ones_TK)

    def first_choices(self) -> Tensor:
        """(T, E) one-hot of each token's first choice (token-choice routers; zeros otherwise)."""
        T, E = self.logits.shape
        out_TE = torch.zeros(T, E, dtype=self.logits.dtype, device=self.logits.device)
        if self.kind != "token_choice" or self.expert_ids.shape[-1] == 0:
            return out_TE
        return out_TE.scatter(1, self.expert_ids[:, :1], 1.0)


def check_top_k(top_k: int, num_experts: int) -> None:
    if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 1:
        raise ValueError(f"num_experts: must be a positive int, got {num_experts!r}")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k: must be an int in [1, num_experts={num_experts}], got {top_k!r}")


def check_weight(name: str, value: float) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name}: must be a non-negative number, got {value!r}")
    return float(value)


class Router(nn.Module):
    """Base router: a linear gate ``logits = x W`` in float32 (float64 for float64 input) plus the
    balancing bookkeeping every router shares.

    The contract a router (built-in, subclass or a new file registered in ``ROUTERS``) follows:
      * class attributes: ``kind`` — the kind of decision it makes (``"token_choice"``,
        ``"expert_choice"`` or ``"soft"``); ``supports_capacity`` — whether a capacity limit applies;
        ``default_weights`` — its family's loss coefficients; ``has_load_loss``;
      * :meth:`route` ``(x_TD, *, mask_T=None, generator=None, group_size=None) -> RoutingDecision``:
        the decision only. Masked tokens (``mask_T`` False) must not be selected by expert-choice
        routers; token-choice routers may select them (the layer drops those assignments);
        ``generator`` seeds the router's noise;
      * optionally :meth:`load_per_token` (T, E) for a smooth load estimate.
    :meth:`forward` adds the statistics (:meth:`statistics`, per routing group of ``group_size``
    tokens), optionally sums them over a process group, and forms the weighted aux loss from them
    (:meth:`balance_losses`). Loss coefficients are uniform keywords across routers: ``w_importance``,
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

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, zero_init: bool = False,
                 check_finite: bool = True, w_importance: float | None = None, w_load: float | None = None,
                 w_switch: float | None = None, w_z: float | None = None):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: must be a positive int, got {dim!r}")
        check_top_k(top_k, num_experts)
        if self.kind not in DECISION_KINDS:
            raise ValueError(f"{type(self).__name__}.kind: expected one of {DECISION_KINDS}, got {self.kind!r}")
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.check_finite = bool(check_finite)
        given = {"w_importance": w_importance, "w_load": w_load, "w_switch": w_switch, "w_z": w_z}
        for name, value in given.items():
            setattr(self, name, check_weight(name, self.default_weights[name] if value is None else value))
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

    @staticmethod
    def routing_dtype(x: Tensor) -> torch.dtype:
        """Routing runs in float32 (float64 for float64 input): it is precision-sensitive."""
        return torch.float64 if x.dtype == torch.float64 else torch.float32

    def linear(self, x_TD: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
        """``x W^T (+ b)`` in the routing dtype, outside any autocast region."""
        dtype = self.routing_dtype(x_TD)
        with torch.autocast(x_TD.device.type, enabled=False):
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
                group_size: int | None = None, stats_group=None) -> RoutingDecision:
        """Route T tokens. ``mask_T`` (T,) bool: True = real token; ``group_size``: routing groups of
        that many consecutive tokens (statistics and losses per group, averaged); ``stats_group``: a
        process group to sum the statistics over before the losses are formed."""
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (T, {self.dim}), got {tuple(x_TD.shape)}")
        if mask_T is not None and (mask_T.shape != x_TD.shape[:1] or mask_T.dtype != torch.bool):
            raise ValueError(f"mask: expected a bool tensor of shape ({x_TD.shape[0]},), got "
                             f"{mask_T.dtype} {tuple(mask_T.shape)}")
        if group_size is not None and x_TD.shape[0] % group_size:
            raise ValueError(f"group_size: {x_TD.shape[0]} tokens do not split into groups of {group_size}")
        decision = self.route(x_TD, mask_T=mask_T, generator=generator, group_size=group_size)
        if decision.kind != self.kind:
            raise ValueError(f"{type(self).__name__}: declared kind {self.kind!r} but returned a "
                             f"{decision.kind!r} decision")
        if decision.load is None:
            decision.load = self.load_per_token(decision)
        stats = self.statistics(decision, mask_T, group_size)
        if stats_group is not None:
            stats = stats.all_reduce(stats_group)
        decision.stats = stats
        aux, metrics = self.balance_losses(stats)
        decision.aux_loss = aux
        decision.metrics.update(metrics)
        return decision

    def route(self, x_TD: Tensor, *, mask_T: Tensor | None = None, generator: torch.Generator | None = None,
              group_size: int | None = None) -> RoutingDecision:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- statistics and losses ------------------------------------------------------------------
    def load_per_token(self, d: RoutingDecision) -> Tensor | None:
        """(T, E) smooth load estimate of this family, or None when it has none (e.g. no noise)."""
        return None

    def statistics(self, d: RoutingDecision, mask_T: Tensor | None = None,
                   group_size: int | None = None) -> RoutingStats:
        """Per-group sums over the real tokens (see :class:`moekit.stats.RoutingStats`)."""
        probs_TE = d.probs
        T, E = probs_TE.shape
        m_T = None if mask_T is None else mask_T.to(probs_TE.dtype)

        def gsum(v_T_: Tensor) -> Tensor:          # masked per-token values summed per routing group
            if m_T is not None:
                v_T_ = v_T_ * m_T.view(-1, *([1] * (v_T_.dim() - 1)))
            return group_sum(v_T_, group_size)

        gates_TE = d.importance_gates if d.importance_gates is not None else probs_TE
        G = 1 if group_size is None else T // group_size
        if d.kind == "token_choice":
            # counts straight into (G·E) bins: no (T, E) one-hot is materialised
            ids_TK = d.expert_ids
            K = ids_TK.shape[-1]
            bin_TK = ids_TK if group_size is None else \
                ids_TK + (torch.arange(T, device=ids_TK.device) // group_size * E)[:, None]
            w_TK = torch.ones(T, K, dtype=probs_TE.dtype, device=probs_TE.device) if m_T is None else \
                m_T[:, None].expand(T, K)
            counts = probs_TE.new_zeros(G * E).scatter_add(0, bin_TK.reshape(-1), w_TK.reshape(-1)).view(G, E)
            top1 = probs_TE.new_zeros(G * E).scatter_add(0, bin_TK[:, 0], w_TK[:, 0]).view(G, E) if K else \
                probs_TE.new_zeros(G, E)
            top_k = K
        else:
            counts, top1, top_k = gsum(d.selections()), gsum(d.first_choices()), 1
        return RoutingStats(
            num_tokens=group_sum(torch.ones_like(probs_TE[:, 0]) if m_T is None else m_T, group_size),
            counts=counts,
            top1_counts=top1,
            prob_sum=gsum(probs_TE),
            importance=gsum(gates_TE),
            z_sum=gsum(torch.logsumexp(d.logits, dim=-1).pow(2)),
            top_k=top_k,
            load=None if d.load is None else gsum(d.load),
        )

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
