"""The sparse Mixture-of-Experts layer: router → dispatch → experts → combine.

Legend: T tokens, D model dim, H expert hidden dim, E experts, K experts per token, A assignments,
G groups (sequences, soft routing), N tokens per group, S slots per expert.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..dispatch import DISPATCHERS, capacity_mask, expert_capacity
from ..experts import ExpertBank, build_experts
from ..routing import ROUTERS, Router, RoutingDecision, build_router
from ..routing.soft import SoftRouter
from ..types import MoEOutput

def _cv(v: Tensor) -> Tensor:
    v = v.float()
    if v.numel() <= 1:
        return torch.zeros((), device=v.device)
    return v.std(unbiased=False) / (v.mean() + 1e-10)


def routing_metrics(decision: RoutingDecision, tokens_per_expert_E: Tensor, dropped: int | Tensor,
                    total: int, skipped: int | Tensor = 0, num_tokens: int | None = None) -> dict[str, Tensor]:
    """Per-expert statistics and balance diagnostics for one forward pass (all detached).

    ``dropped`` counts dropped (token, slot) assignments out of ``total``; ``skipped`` counts tokens
    that lost *all* their assignments (the layer outputs 0 for them: only the residual carries them)
    out of ``num_tokens``.
    """
    probs_TE = decision.probs.detach()
    entropy = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1).mean()
    gates_TE = (decision.importance_gates if decision.importance_gates is not None else probs_TE).detach()
    load_E = tokens_per_expert_E.float()
    dropped = torch.as_tensor(dropped, dtype=torch.float32, device=load_E.device)
    return {
        "tokens_per_expert": load_E,
        "dropped_tokens": dropped,
        "dropped_fraction": dropped / max(total, 1),
        "skipped_fraction": torch.as_tensor(skipped, dtype=torch.float32, device=load_E.device)
        / max(num_tokens if num_tokens is not None else total, 1),
        "router_entropy": entropy,
        "cv_importance": _cv(gates_TE.sum(0)),
        "cv_load": _cv(load_E),
        "max_over_mean_load": load_E.max() / (load_E.mean() + 1e-10),
        "experts_used": (load_E > 0).sum().float(),
    }


class MoE(nn.Module):
    """Sparse MoE layer, drop-in for an MLP block: ``MoE(dim, hidden_dim, num_experts, top_k)(x)``.

    ``forward(x)`` takes ``x`` of shape (..., dim) and returns ``MoEOutput(y, aux_loss, metrics)``:
    ``y`` has x's shape; ``aux_loss`` is the router's weighted balancing loss (a zero scalar when no
    loss applies); ``metrics`` holds detached per-expert statistics and the unweighted losses.

    Args:
        router: a name from :data:`moekit.routing.ROUTERS` (``"topk"``, ``"noisy_topk"``, ``"switch"``,
            ``"softmax"``, ``"expert_choice"``, ``"soft"``, ``"sigmoid"``) or a :class:`Router` instance.
        expert: ``"glu"`` (SwiGLU), ``"mlp"`` (Linear–act–Linear), a list of E ``nn.Module`` or a
            factory returning one (slower per-expert path).
        top_k: experts per token (default 2; the dense softmax router uses all E; soft and expert-choice
            routing take none).
        capacity_factor: ``None`` = dropless. With a number c, each expert takes at most
            ``C = ceil(T·k·c/E)`` assignments, first choices before second choices; overflow is dropped
            (that slot contributes 0, the residual carries the token) and counted in metrics. For
            ``router="expert_choice"`` it is the router's capacity factor (default 2).
        group_size: with a capacity, split the T tokens into consecutive groups of this many tokens and
            give every expert ``C = ceil(group_size·k·c/E)`` slots *per group* (V-MoE / GShard route within
            groups, e.g. the tokens of a few images); T must be a multiple of it. ``None`` = one group.
        batch_priority: Batch Priority Routing — serve tokens by descending top gate instead of token order.
        num_shared_experts / shared_hidden_dim: dense experts applied to every token, added to the output.
        w_importance, w_load, w_switch, w_z: loss coefficients (None = the router family's default).
        router_options: extra keywords for the router (e.g. ``{"noise_std": "1/E", "renormalize": False}``).
        dispatch: ``"sorted"`` (grouped matmuls, default) or ``"reference"`` (dense oracle, for tests).
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int | None = None, *,
                 router: str | Router = "topk", expert: str | list[nn.Module] | Callable[[], nn.Module] = "glu",
                 capacity_factor: float | None = None, batch_priority: bool = False, group_size: int | None = None,
                 num_shared_experts: int = 0, shared_hidden_dim: int | None = None,
                 activation: str | None = None, bias: bool = False, dispatch: str = "sorted",
                 router_options: dict[str, Any] | None = None, w_importance: float | None = None,
                 w_load: float | None = None, w_switch: float | None = None, w_z: float | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}: must be a positive int, got {v!r}")
        if dispatch not in DISPATCHERS:
            raise ValueError(f"dispatch: unknown {dispatch!r}; choose one of {sorted(DISPATCHERS)}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts: must be a non-negative int, got {num_shared_experts!r}")
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.dispatch = dispatch
        self.batch_priority = bool(batch_priority)

        # --- router -------------------------------------------------------------------------------
        options = dict(router_options or {})
        for name, w in (("w_importance", w_importance), ("w_load", w_load), ("w_switch", w_switch), ("w_z", w_z)):
            if w is not None:
                options[name] = w
        if isinstance(router, Router):
            if options:
                raise ValueError("router_options/w_*: configure a Router instance directly, not through MoE")
            if router.num_experts != num_experts or router.dim != dim:
                raise ValueError(f"router: instance has dim={router.dim}, num_experts={router.num_experts}; "
                                 f"the layer has dim={dim}, num_experts={num_experts}")
            self.router = router
        elif isinstance(router, str):
            if router not in ROUTERS:
                raise ValueError(f"router: unknown router {router!r}; choose one of {sorted(ROUTERS)}")
            if router == "expert_choice" and capacity_factor is not None:
                options.setdefault("capacity_factor", capacity_factor)
            # top_k=None leaves each family its own default (2 for top-k families, 1 for switch).
            self.router = build_router(router, dim, num_experts, top_k, **options)
        else:
            raise TypeError(f"router: expected a router name {sorted(ROUTERS)} or a Router, got "
                            f"{type(router).__name__}")
        self.top_k = self.router.top_k
        self.soft = isinstance(self.router, SoftRouter)
        self.token_choice = not self.soft and type(self.router).__name__ != "ExpertChoiceRouter"

        # --- capacity -----------------------------------------------------------------------------
        if capacity_factor is not None:
            expert_capacity(1, 1, 1, capacity_factor)            # validates the value
            if self.soft or type(self.router).__name__ == "SoftmaxRouter":
                raise ValueError("capacity_factor: soft and dense softmax routing drop nothing; use None")
        if self.batch_priority and (capacity_factor is None or not self.token_choice):
            raise ValueError("batch_priority: needs capacity_factor and a token-choice router")
        self.capacity_factor = capacity_factor if self.token_choice else None
        if group_size is not None:
            if not isinstance(group_size, int) or isinstance(group_size, bool) or group_size < 1:
                raise ValueError(f"group_size: must be a positive int or None, got {group_size!r}")
            if not self.token_choice:
                raise ValueError("group_size: groups apply to capacity-limited token-choice routing")
        self.group_size = group_size

        # --- experts ------------------------------------------------------------------------------
        expert_opts: dict[str, Any] = {}
        if isinstance(expert, str):
            if activation is not None:
                expert_opts["activation"] = activation
            if bias:
                expert_opts["bias"] = bias
        self.experts: ExpertBank = build_experts(expert, num_experts, dim, hidden_dim, **expert_opts)
        self.shared: ExpertBank | None = None
        if num_shared_experts > 0:
            kind = expert if isinstance(expert, str) else "mlp"
            shared_h = (shared_hidden_dim or hidden_dim) * num_shared_experts
            self.shared = build_experts(kind, 1, dim, shared_h, **expert_opts)

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, group_size={self.group_size}, "
                f"dispatch={self.dispatch}")

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Change the capacity ratio, e.g. at evaluation time (V-MoE evaluates at several c)."""
        if capacity_factor is not None:
            expert_capacity(1, 1, 1, capacity_factor)
            if not self.token_choice:
                raise ValueError("capacity_factor: only token-choice routers take a capacity here")
        elif self.batch_priority:
            raise ValueError("capacity_factor: batch_priority needs a capacity; disable it first")
        self.capacity_factor = capacity_factor

    def set_batch_priority(self, batch_priority: bool) -> None:
        """Switch Batch Priority Routing on or off (it needs a capacity and a token-choice router)."""
        if not isinstance(batch_priority, bool):
            raise TypeError(f"batch_priority: expected a bool, got {type(batch_priority).__name__}")
        if batch_priority and (self.capacity_factor is None or not self.token_choice):
            raise ValueError("batch_priority: needs capacity_factor and a token-choice router")
        self.batch_priority = batch_priority

    # ------------------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> MoEOutput:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        if self.soft:
            y, decision, load_E = self._soft_forward(x)
            dropped, total = 0, x.numel() // self.dim
            skipped, num_tokens = 0, total
        else:
            x_TD = x.reshape(-1, self.dim)
            y_TD, decision, load_E, dropped, total, skipped = self._sparse_forward(x_TD)
            num_tokens = x_TD.shape[0]
            y = y_TD.view(x.shape)
        if self.shared is not None:
            x_TD = x.reshape(-1, self.dim)
            counts = torch.tensor([x_TD.shape[0]], device=x.device)
            y = y + self.shared(x_TD, counts).view(x.shape)
        metrics = routing_metrics(decision, load_E, dropped, total, skipped, num_tokens)
        metrics.update(decision.metrics)
        return MoEOutput(y, decision.aux_loss, metrics)

    def _sparse_forward(self, x_TD: Tensor):
        T = x_TD.shape[0]
        d = self.router(x_TD)                                         # router
        token_A, expert_A, weight_A = d.assignments()
        total = token_A.numel()
        dropped: int | Tensor = 0
        skipped: int | Tensor = 0
        if self.capacity_factor is not None:                          # capacity: drop the overflow
            keep_A = self._capacity_keep(d).t().reshape(-1)
            dropped = (~keep_A).sum()
            skipped = T - keep_A.view(-1, T).any(dim=0).sum()         # tokens with no slot left
            token_A, expert_A, weight_A = token_A[keep_A], expert_A[keep_A], weight_A[keep_A]
        elif not self.token_choice:                                   # expert choice: tokens nobody took
            total = T
            dropped = T - torch.unique(token_A).numel()
            skipped = dropped
        y_TD = DISPATCHERS[self.dispatch](x_TD, token_A, expert_A, weight_A, self.experts)  # dispatch+experts+combine
        load_E = torch.bincount(expert_A, minlength=self.num_experts)
        return y_TD, d, load_E, dropped, total, skipped

    def _capacity_keep(self, d: RoutingDecision) -> Tensor:
        """``keep_TK``: which assignments fit the per-expert capacity (per group with ``group_size``)."""
        T, E = d.expert_ids.shape[0], self.num_experts
        priority_T = d.weights.detach().max(dim=-1).values if self.batch_priority else None
        if self.group_size is None:
            return capacity_mask(d.expert_ids, E, expert_capacity(T, self.top_k, E, self.capacity_factor), priority_T)
        S = self.group_size
        if T % S:
            raise ValueError(f"group_size: {T} tokens do not split into groups of {S}")
        # (group, expert) pairs are independent queues: expert e of group g becomes queue g·E + e.
        group_T = torch.arange(T, device=d.expert_ids.device) // S
        queue_TK = d.expert_ids + (group_T * E)[:, None]
        return capacity_mask(queue_TK, (T // S) * E, expert_capacity(S, self.top_k, E, self.capacity_factor),
                             priority_T)

    def _soft_forward(self, x: Tensor):
        router: SoftRouter = self.router  # type: ignore[assignment]
        E, S, D = self.num_experts, router.slots_per_expert, self.dim
        x_GND = x.reshape(1, -1, D) if x.dim() <= 2 else x.reshape(-1, x.shape[-2], D)
        G, N = x_GND.shape[:2]
        d = router(x_GND.reshape(-1, D))       # routing summary + (zero) aux loss, for metrics
        dispatch_GNZ, combine_GNZ, _ = router.slot_weights(x_GND)   # Z = E·S slots
        slots_GZD = torch.einsum("gnz,gnd->gzd", dispatch_GNZ.to(x.dtype), x_GND)
        # Rows grouped by expert: (E, G, S, D) -> (E·G·S, D), G·S rows per expert.
        rows = slots_GZD.view(G, E, S, D).permute(1, 0, 2, 3).reshape(E * G * S, D)
        counts_E = torch.full((E,), G * S, dtype=torch.long, device=x.device)
        if self.dispatch == "reference":
            out_EGSD = self.experts.forward_dense(rows)[torch.arange(E).repeat_interleave(G * S),
                                                         torch.arange(E * G * S)].view(E, G, S, D)
        else:
            out_EGSD = self.experts(rows, counts_E).view(E, G, S, D)
        out_GZD = out_EGSD.permute(1, 0, 2, 3).reshape(G, E * S, D)
        y_GND = torch.einsum("gnz,gzd->gnd", combine_GNZ.to(x.dtype), out_GZD)
        return y_GND.reshape(x.shape), d, counts_E
