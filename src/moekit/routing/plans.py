"""Routing plans: what a router decided for a batch, and how to run it.

A router returns a plan of its decision kind, holding only the fields that kind has:

* :class:`TokenChoicePlan` — each token picks K experts (``expert_ids``/``weights`` (T, K));
* :class:`ExpertChoicePlan` — each expert picks its tokens (flat ``token_A``/``expert_A``/``weight_A``);
* :class:`SoftPlan` — every expert slot is a mixture of a group's tokens (``dispatch_GNZ``/``combine_GNZ``).

Every plan forms its routing statistics (:meth:`RoutingPlan.statistics`) and runs itself
(:meth:`RoutingPlan.run`) through a dispatcher and an expert bank, returning the output and its
detached metrics. The layer therefore never branches on the kind of routing: a new kind plugs in by
writing a plan. All metrics are built from tensors already on the device (no host synchronisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from ..dispatch import Assignments, CapacityPolicy, TokenDispatcher, expert_counts
from ..experts.bank import ExpertBank, compute_dtype
from ..stats import RoutingStats, group_sum

#: the kinds of routing decision a plan can carry
DECISION_KINDS = ("token_choice", "expert_choice", "soft")


def _cv(v: Tensor) -> Tensor:
    v = v.float()
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.std(unbiased=False) / (v.mean() + 1e-10)


def _num_real(mask_T: Tensor | None, ref_TE: Tensor) -> Tensor:
    """Real tokens as a float scalar on the device (a fill, not a copy from the host)."""
    if mask_T is None:
        return torch.full((), ref_TE.shape[0], dtype=torch.float32, device=ref_TE.device)
    return mask_T.sum().float()


@dataclass(eq=False, kw_only=True)
class RoutingPlan:
    """Fields every kind has. ``logits`` (T, E): the router's clean logits, in the routing dtype;
    ``probs`` (T, E): its distribution over all experts (rows sum to 1); ``load`` (T, E): a smooth
    per-token load estimate for routers that have one. ``stats``, ``aux_loss`` and ``metrics`` (the
    unweighted losses) are filled in by :meth:`Router.forward <moekit.routing.Router.forward>`."""
    kind: ClassVar[str] = ""
    logits: Tensor
    probs: Tensor
    load: Tensor | None = None
    stats: RoutingStats | None = None
    aux_loss: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return self.probs.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    # ---- statistics ---------------------------------------------------------------------------
    def importance_gates(self) -> Tensor:
        """(T, E) the gates whose column sums are Shazeer's "importance" (default: ``probs``)."""
        return self.probs

    def selections(self, mask_T: Tensor | None, group_size: int | None) -> tuple[Tensor, Tensor, int]:
        """Per-group ``(counts_GE, top1_counts_GE, top_k)`` over the real tokens."""
        raise NotImplementedError  # pragma: no cover

    def statistics(self, mask_T: Tensor | None = None, group_size: int | None = None) -> RoutingStats:
        """Per-group sums over the real tokens (see :class:`moekit.stats.RoutingStats`)."""
        probs_TE = self.probs
        m_T = None if mask_T is None else mask_T.to(probs_TE.dtype)

        def gsum(v_T_: Tensor) -> Tensor:          # masked per-token values summed per routing group
            if m_T is not None:
                v_T_ = v_T_ * m_T.view(-1, *([1] * (v_T_.dim() - 1)))
            return group_sum(v_T_, group_size)

        counts, top1, top_k = self.selections(mask_T, group_size)
        return RoutingStats(
            num_tokens=group_sum(torch.ones_like(probs_TE[:, 0]) if m_T is None else m_T, group_size),
            counts=counts, top1_counts=top1, prob_sum=gsum(probs_TE), importance=gsum(self.importance_gates()),
            z_sum=gsum(torch.logsumexp(self.logits, dim=-1).pow(2)), top_k=top_k,
            load=None if self.load is None else gsum(self.load))

    # ---- execution ----------------------------------------------------------------------------
    def run(self, x_TD: Tensor, experts: ExpertBank, dispatcher: TokenDispatcher, capacity: CapacityPolicy, *,
            mask_T: Tensor | None = None, group_size: int | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Execute the plan: ``(y_TD, metrics)``. Masked tokens take no expert and no capacity."""
        raise NotImplementedError  # pragma: no cover

    def _metrics(self, load_E: Tensor, mask_T: Tensor | None, *, total: Tensor, dropped: Tensor,
                 skipped: Tensor, load_name: str = "tokens_per_expert") -> dict[str, Tensor]:
        """Per-expert statistics and balance diagnostics (all detached).

        ``load_E``: executed assignments per expert; ``dropped`` counts (token, expert) assignments a
        capacity dropped out of ``total``; ``skipped`` the real tokens that lost *all* their assignments
        (the layer outputs 0 for them: only the residual carries them)."""
        probs_TE = self.probs.detach()
        n_real = _num_real(mask_T, probs_TE)
        ent_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)
        if mask_T is not None:
            ent_T = ent_T * mask_T.to(ent_T.dtype)
        load_E = load_E.detach().float()
        imp_E = (self.stats.importance.sum(0) if self.stats is not None else self.importance_gates().sum(0)).detach()
        return {
            load_name: load_E,
            "dropped_assignments": dropped.float(),
            "dropped_fraction": dropped.float() / total.float().clamp_min(1),
            "skipped_tokens": skipped.float(),
            "skipped_fraction": skipped.float() / n_real.clamp_min(1),
            "router_entropy": (ent_T.sum() / n_real.clamp_min(1)).float(),
            "cv_importance": _cv(imp_E),
            "cv_load": _cv(load_E),
            "max_over_mean_load": load_E.max() / (load_E.mean() + 1e-10) if load_E.numel() else load_E.sum(),
            "experts_used": (load_E > 0).sum().float(),
        }


@dataclass(eq=False, kw_only=True)
class TokenChoicePlan(RoutingPlan):
    """Each token picks K experts: ``expert_ids`` (T, K) long, best first, and combine ``weights``
    (T, K). ``gates`` (T, E): the dense gates importance is defined on, when they differ from
    ``probs`` (noisy top-k); ``priority`` (T,): the Batch Priority Routing key (default: the largest
    router probability); ``noisy_logits`` (T, E): the logits the choice was made on, when the router
    added training noise (None otherwise)."""
    kind: ClassVar[str] = "token_choice"
    expert_ids: Tensor
    weights: Tensor
    gates: Tensor | None = None
    priority: Tensor | None = None
    noisy_logits: Tensor | None = None

    def importance_gates(self) -> Tensor:
        return self.probs if self.gates is None else self.gates

    def priority_T(self) -> Tensor:
        """Batch Priority Routing key: the router's raw top-1 gate (V-MoE sorts by it)."""
        return self.probs.detach().max(dim=-1).values if self.priority is None else self.priority

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        """Flat ``(token_A, expert_A, weight_A)`` in slot-major order (all first choices, then all
        second choices, ...: the order capacity serves them in)."""
        a = Assignments.from_grid(self.expert_ids, self.weights, self.num_experts)
        return a.token_A, a.expert_A, a.weight_A

    def selections(self, mask_T, group_size):
        # counts straight into (G·E) bins: no (T, E) one-hot is materialised
        ids_TK, probs_TE = self.expert_ids, self.probs
        T, K = ids_TK.shape
        E = probs_TE.shape[-1]
        G = 1 if group_size is None else T // group_size
        bin_TK = ids_TK if group_size is None else \
            ids_TK + (torch.arange(T, device=ids_TK.device) // group_size * E)[:, None]
        w_TK = torch.ones(T, K, dtype=probs_TE.dtype, device=probs_TE.device) if mask_T is None else \
            mask_T.to(probs_TE.dtype)[:, None].expand(T, K)
        counts = probs_TE.new_zeros(G * E).scatter_add(0, bin_TK.reshape(-1), w_TK.reshape(-1)).view(G, E)
        top1 = probs_TE.new_zeros(G * E).scatter_add(0, bin_TK[:, 0], w_TK[:, 0]).view(G, E) if K else \
            probs_TE.new_zeros(G, E)
        return counts, top1, K

    def run(self, x_TD, experts, dispatcher, capacity, *, mask_T=None, group_size=None):
        E = self.num_experts
        keep_TK = capacity.keep(self.expert_ids, E, mask_T=mask_T, group_size=group_size, priority_T=self.priority_T)
        ids_TK = self.expert_ids if keep_TK is None else \
            torch.where(keep_TK, self.expert_ids, torch.full_like(self.expert_ids, E))     # id E = not executed
        a = Assignments.from_grid(ids_TK, self.weights, E, may_skip=keep_TK is not None)
        y_TD = dispatcher(x_TD, a, experts)
        total = _num_real(mask_T, self.probs) * ids_TK.shape[-1]
        if keep_TK is None:
            dropped = skipped = total * 0
        else:
            real_T = torch.ones_like(keep_TK[:, 0]) if mask_T is None else mask_T
            dropped = total - keep_TK.sum()
            skipped = (real_T & ~keep_TK.any(dim=-1)).sum()
        return y_TD, self._metrics(expert_counts(a.expert_A, E), mask_T, total=total, dropped=dropped,
                                   skipped=skipped)


@dataclass(eq=False, kw_only=True)
class ExpertChoicePlan(RoutingPlan):
    """Each expert picks its tokens: flat ``token_A``/``expert_A``/``weight_A`` (A entries); a token
    may get 0, 1 or several experts. Balanced by construction: nothing is dropped."""
    kind: ClassVar[str] = "expert_choice"
    token_A: Tensor
    expert_A: Tensor
    weight_A: Tensor

    def assignments(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.token_A, self.expert_A, self.weight_A

    def selections(self, mask_T, group_size):
        T, E = self.probs.shape
        picks_TE = torch.zeros(T, E, dtype=self.probs.dtype, device=self.probs.device).index_put(
            (self.token_A, self.expert_A), torch.ones_like(self.weight_A, dtype=self.probs.dtype), accumulate=True)
        if mask_T is not None:
            picks_TE = picks_TE * mask_T.to(picks_TE.dtype)[:, None]
        return group_sum(picks_TE, group_size), group_sum(torch.zeros_like(picks_TE), group_size), 1

    def run(self, x_TD, experts, dispatcher, capacity, *, mask_T=None, group_size=None):
        T, E = self.probs.shape
        a = Assignments(self.token_A, self.expert_A, self.weight_A, T, E)
        y_TD = dispatcher(x_TD, a, experts)
        picked_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device).index_fill(0, self.token_A, True)
        real_T = torch.ones_like(picked_T) if mask_T is None else mask_T
        total = torch.full((), self.token_A.shape[0], dtype=torch.float32, device=x_TD.device)
        return y_TD, self._metrics(expert_counts(self.expert_A, E), mask_T, total=total, dropped=total * 0,
                                   skipped=(real_T & ~picked_T).sum())


@dataclass(eq=False, kw_only=True)
class SoftPlan(RoutingPlan):
    """Soft MoE: per group of N tokens, ``dispatch_GNZ`` mixes the tokens into the Z = E·S slots (sums
    to 1 over the N tokens) and ``combine_GNZ`` mixes the slot outputs back into tokens (sums to 1
    over the slots). Nothing is dropped; masked tokens have zero dispatch and combine weight."""
    kind: ClassVar[str] = "soft"
    dispatch_GNZ: Tensor
    combine_GNZ: Tensor
    slots_per_expert: int

    def weights_TE(self) -> Tensor:
        """(T, E) each token's combine weight per expert (summed over the expert's slots)."""
        G, N, Z = self.combine_GNZ.shape
        return self.combine_GNZ.reshape(G * N, self.num_experts, self.slots_per_expert).sum(-1)

    def selections(self, mask_T, group_size):
        w_TE = self.weights_TE()
        if mask_T is not None:
            w_TE = w_TE * mask_T.to(w_TE.dtype)[:, None]
        return group_sum(w_TE, group_size), group_sum(torch.zeros_like(w_TE), group_size), 1

    def run(self, x_TD, experts, dispatcher, capacity, *, mask_T=None, group_size=None):
        """Slots go through the dispatcher as rows already grouped by expert (G·S rows each); the
        outputs are mixed back into tokens by the combine weights."""
        E, S = self.num_experts, self.slots_per_expert
        G, N, _ = self.dispatch_GNZ.shape
        D = x_TD.shape[-1]
        param = next(experts.parameters(), None)
        cdt = x_TD.dtype if param is None else compute_dtype(x_TD, param)
        slots_GZD = torch.einsum("gnz,gnd->gzd", self.dispatch_GNZ.to(cdt), x_TD.reshape(G, N, D).to(cdt))
        # (G, E, S, D) -> (E, G, S, D) -> (E·G·S, D): rows grouped by expert
        rows_RD = slots_GZD.view(G, E, S, D).permute(1, 0, 2, 3).reshape(E * G * S, D)
        R = rows_RD.shape[0]
        a = Assignments(torch.arange(R, device=x_TD.device), torch.arange(E, device=x_TD.device).repeat_interleave(G * S),
                        torch.ones(R, dtype=rows_RD.dtype, device=x_TD.device), R, E, top_k=1)
        out_RO = dispatcher(rows_RD, a, experts)
        O = out_RO.shape[-1]                # O: the experts' output features (D for the package's banks)
        out_GZO = out_RO.view(E, G, S, O).permute(1, 0, 2, 3).reshape(G, E * S, O)
        y_TO = torch.einsum("gnz,gzd->gnd", self.combine_GNZ.to(out_GZO.dtype), out_GZO).reshape(G * N, O)
        slots_E = torch.full((E,), G * S, dtype=torch.float32, device=x_TD.device)
        zero = slots_E.sum() * 0
        return y_TO, self._metrics(slots_E, mask_T, total=zero, dropped=zero, skipped=zero,
                                   load_name="slots_per_expert")


def plan_kind(plan: Any) -> str:
    """The decision kind a plan object carries (its class's ``kind``)."""
    kind = getattr(type(plan), "kind", "")
    if kind not in DECISION_KINDS:
        raise ValueError(f"plan: expected a RoutingPlan of kind {DECISION_KINDS}, got {type(plan).__name__}")
    return kind
