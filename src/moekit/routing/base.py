"""Router base class and the routing decision every router returns.

Legend: T tokens, D model dim, E experts, K experts per token, A flat (token, expert) assignments.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .. import losses as L


@dataclass
class RoutingDecision:
    """What a router decided for a batch of T tokens.

    Token-choice routers fill ``expert_ids``/``weights`` (T, K). Routers whose assignment is not
    K-per-token (expert choice) also give the flat list of assignments (``assign_*``, A entries);
    :meth:`assignments` returns the flat form for every router.
    """
    expert_ids: Tensor                 # (T, K) long: chosen experts, best first
    weights: Tensor                    # (T, K) float32: combine weights
    logits: Tensor                     # (T, E) float32: clean router logits
    probs: Tensor                      # (T, E) float32: router's distribution over all experts (rows sum to 1)
    noisy_logits: Tensor | None = None  # (T, E) logits with training noise, when noise is used
    noise_std: Tensor | float | None = None  # (T, E) or scalar noise std, when noise is used
    aux_loss: Tensor | None = None     # weighted scalar
    metrics: dict[str, Tensor] = field(default_factory=dict)  # unweighted losses, detached
    assign_token: Tensor | None = None   # (A,) long, only for non token-choice routers
    assign_expert: Tensor | None = None  # (A,) long
    assign_weight: Tensor | None = None  # (A,) float32
    importance_gates: Tensor | None = None  # (T, E) the gates whose column sums are "importance"

    @property
    def num_experts(self) -> int:
        return self.logits.shape[-1]

    @property
    def token_choice(self) -> bool:
        return self.assign_token is None

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat ``(token_A, expert_A, weight_A)``; for top-k routers in slot-major order
        (all first choices, then all second choices, ...), which is the order capacity uses."""
        if self.assign_token is not None:
            return self.assign_token, self.assign_expert, self.assign_weight
        T, K = self.expert_ids.shape
        token_KT = torch.arange(T, device=self.expert_ids.device).expand(K, T)
        return token_KT.reshape(-1), self.expert_ids.t().reshape(-1), self.weights.t().reshape(-1)

    def gates(self) -> Tensor:
        """Dense (T, E) combine-weight matrix (zeros for unselected experts)."""
        if self.importance_gates is not None and self.assign_token is not None:
            return self.importance_gates
        token_A, expert_A, weight_A = self.assignments()
        T = self.logits.shape[0]
        out_TE = torch.zeros(T, self.num_experts, dtype=weight_A.dtype, device=weight_A.device)
        return out_TE.index_put((token_A, expert_A), weight_A, accumulate=True)


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
    """Base router: a float32 linear gate ``logits = x W`` plus loss bookkeeping.

    Subclasses implement :meth:`route`. Loss coefficients are uniform keywords across routers:
    ``w_importance``, ``w_load``, ``w_switch``, ``w_z``; a coefficient of 0 skips that loss in the
    aux loss (cheap diagnostics are still reported in metrics).
    """

    #: default loss coefficients of this router family (overridable per instance)
    default_weights: dict[str, float] = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 0.0, "w_z": 0.0}
    #: whether this family defines a load loss (``w_load > 0`` is refused otherwise)
    has_load_loss: bool = False

    def __init__(self, dim: int, num_experts: int, top_k: int = 1, *, zero_init: bool = False,
                 check_finite: bool = True, w_importance: float | None = None, w_load: float | None = None,
                 w_switch: float | None = None, w_z: float | None = None):
        super().__init__()
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 1:
            raise ValueError(f"dim: must be a positive int, got {dim!r}")
        check_top_k(top_k, num_experts)
        self.dim, self.num_experts, self.top_k = dim, num_experts, top_k
        self.check_finite = check_finite
        given = {"w_importance": w_importance, "w_load": w_load, "w_switch": w_switch, "w_z": w_z}
        for name, value in given.items():
            setattr(self, name, check_weight(name, self.default_weights[name] if value is None else value))
        if self.w_load > 0 and not self.has_load_loss:
            raise ValueError(f"w_load: {type(self).__name__} has no load loss; use w_load=0 "
                             "(routers with one: noisy_topk, topk with noise_std > 0)")
        self.gate = nn.Linear(dim, num_experts, bias=False)
        if zero_init:
            nn.init.zeros_(self.gate.weight)
        else:
            nn.init.normal_(self.gate.weight, std=dim ** -0.5)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, num_experts={self.num_experts}, top_k={self.top_k}"

    def logits(self, x_TD: Tensor) -> Tensor:
        """Router logits in float32 whatever the input dtype (routing is precision-sensitive)."""
        logits_TE = x_TD.float() @ self.gate.weight.float().t()
        if self.check_finite and not bool(torch.isfinite(logits_TE).all()):
            raise FloatingPointError(
                f"{type(self).__name__}: router logits contain NaN/Inf (input finite: "
                f"{bool(torch.isfinite(x_TD).all())}); refusing to route")
        return logits_TE

    def forward(self, x_TD: Tensor) -> RoutingDecision:
        if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
            raise ValueError(f"x: expected shape (T, {self.dim}), got {tuple(x_TD.shape)}")
        decision = self.route(x_TD)
        aux, metrics = self.losses(decision)
        decision.aux_loss = aux
        decision.metrics.update(metrics)
        return decision

    def route(self, x_TD: Tensor) -> RoutingDecision:  # pragma: no cover - abstract
        raise NotImplementedError

    # ---- losses -------------------------------------------------------------------------------
    def load_loss(self, d: RoutingDecision) -> Tensor | None:
        """The family's load loss (unweighted), or None when it has none."""
        return None

    def losses(self, d: RoutingDecision) -> tuple[Tensor, dict[str, Tensor]]:
        """Weighted aux loss and the unweighted parts (detached) for logging."""
        aux = torch.zeros((), device=d.logits.device, dtype=torch.float32)
        metrics: dict[str, Tensor] = {}
        parts: dict[str, tuple[float, Tensor | None]] = {
            # E·Σ f_i P_i is identically 1 when every token uses every expert: only report it for k < E.
            "switch_loss": (self.w_switch, L.balance_loss(d.probs, d.expert_ids)
                            if d.token_choice and d.expert_ids.shape[-1] < d.num_experts else None),
            "z_loss": (self.w_z, L.router_z_loss(d.logits)),
            "importance_loss": (self.w_importance, L.importance_loss(
                d.importance_gates if d.importance_gates is not None else d.probs)),
        }
        if self.w_load > 0 or d.noisy_logits is not None:
            parts["load_loss"] = (self.w_load, self.load_loss(d))
        for name, (w, value) in parts.items():
            if value is None:
                continue
            metrics[name] = value.detach()
            if w > 0:
                aux = aux + w * value
        return aux, metrics
