"""The sparse Mixture-of-Experts layer: router → capacity → dispatch → experts → combine.

Legend: T tokens, D model dim, H expert hidden dim, E experts, K experts per token, A assignments,
R rows handed to the experts, G routing groups, N tokens per group, S slots per expert, Z = E·S slots.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..dispatch import DISPATCHERS, Assignments, TokenDispatcher, capacity_keep, expert_capacity, expert_counts
from ..dispatch.capacity import _check_multiple
from ..experts import ExpertBank, build_experts
from ..experts.bank import ACTIVATIONS, compute_dtype
from ..routing import ROUTERS, Router, RoutingDecision, build_router
from ..types import MoEOutput


def _cv(v: Tensor) -> Tensor:
    v = v.float()
    if v.numel() <= 1:
        return torch.zeros((), device=v.device)
    return v.std(unbiased=False) / (v.mean() + 1e-10)


def routing_metrics(decision: RoutingDecision, tokens_per_expert_E: Tensor, dropped: int | Tensor = 0,
                    total: int | Tensor = 0, skipped: int | Tensor = 0, num_tokens: int | Tensor | None = None,
                    mask_T: Tensor | None = None) -> dict[str, Tensor]:
    """Per-expert statistics and balance diagnostics for one forward pass (all detached, no host sync).

    ``tokens_per_expert_E``: executed assignments per expert (for soft routing: slots per expert,
    reported as ``slots_per_expert``). ``dropped`` counts dropped (token, expert) assignments out of
    ``total``; ``skipped`` counts tokens that lost *all* their assignments (the layer outputs 0 for
    them: only the residual carries them) out of ``num_tokens`` real tokens.
    """
    probs_TE = decision.probs.detach()
    device = probs_TE.device
    ent_T = -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)
    if mask_T is None:
        n_real = torch.tensor(float(probs_TE.shape[0]), device=device) if num_tokens is None else \
            torch.as_tensor(num_tokens, dtype=torch.float32, device=device)
        entropy = ent_T.sum() / n_real.clamp_min(1)
    else:
        m_T = mask_T.to(ent_T.dtype)
        n_real = m_T.sum().float()
        entropy = (ent_T * m_T).sum() / n_real.clamp_min(1)
    load_E = tokens_per_expert_E.detach().float()
    dropped = torch.as_tensor(dropped, dtype=torch.float32, device=device)
    total = torch.as_tensor(total, dtype=torch.float32, device=device)
    skipped = torch.as_tensor(skipped, dtype=torch.float32, device=device)
    imp_E = decision.stats.importance.detach().sum(0) if decision.stats is not None else \
        (decision.importance_gates if decision.importance_gates is not None else probs_TE).detach().sum(0)
    metrics = {
        "slots_per_expert" if decision.kind == "soft" else "tokens_per_expert": load_E,
        "dropped_assignments": dropped,
        "dropped_fraction": dropped / total.clamp_min(1),
        "skipped_tokens": skipped,
        "skipped_fraction": skipped / n_real.clamp_min(1),
        "router_entropy": entropy.float(),
        "cv_importance": _cv(imp_E),
        "cv_load": _cv(load_E),
        "max_over_mean_load": load_E.max() / (load_E.mean() + 1e-10) if load_E.numel() else load_E.sum(),
        "experts_used": (load_E > 0).sum().float(),
    }
    return metrics


def _activation_name(act: Any) -> str:
    """The moekit activation name of a dense MLP's activation module (upcycling)."""
    if isinstance(act, nn.SiLU):
        return "silu"
    if isinstance(act, nn.GELU) and act.approximate == "none":
        return "gelu"
    if isinstance(act, nn.ReLU):
        return "relu"
    if isinstance(act, nn.Tanh):
        return "tanh"
    if isinstance(act, nn.Identity):
        return "identity"
    if callable(act):                     # other activation modules (e.g. a library's own SiLU): by value
        probe = torch.linspace(-6.0, 6.0, 241, dtype=torch.float64)
        with torch.no_grad():
            out = act(probe)
        for name in ("silu", "gelu", "relu", "tanh", "identity"):
            if isinstance(out, Tensor) and torch.allclose(out, ACTIVATIONS[name](probe), rtol=1e-9, atol=1e-12):
                return name
    raise ValueError(f"mlp: activation {act!r} has no moekit equivalent; supported: nn.SiLU, nn.GELU "
                     "(approximate='none'), nn.ReLU, nn.Tanh, nn.Identity")


def _positive_int(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name}: must be a positive int, got {v!r}")


class MoE(nn.Module):
    """Sparse MoE layer, drop-in for an MLP block: ``MoE(dim, hidden_dim, num_experts, top_k)(x)``.

    ``forward(x, mask=None, *, generator=None)`` takes ``x`` of shape (..., dim) and returns
    ``MoEOutput(y, aux_loss, metrics, stats)``: ``y`` has x's shape; ``aux_loss`` is the router's
    weighted balancing loss (a zero scalar when no loss applies); ``metrics`` holds detached per-expert
    statistics and the unweighted losses; ``stats`` the (differentiable) routing statistics the loss
    was formed from — add them over micro-batches and form the loss once with
    ``layer.router.balance_losses(stats)`` for global-batch balancing.

    Args:
        router: a name from :data:`moekit.routing.ROUTERS` (``"topk"``, ``"noisy_topk"``, ``"switch"``,
            ``"vmoe"``, ``"softmax"``, ``"expert_choice"``, ``"soft"``, ``"sigmoid"``) or a :class:`Router`.
        expert: ``"glu"`` (SwiGLU), ``"mlp"`` (Linear–act–Linear), a list of E ``nn.Module`` or a
            factory returning one (slower per-expert path).
        top_k: experts per token (default: the router family's; the dense softmax router uses all E;
            soft and expert-choice routing take none).
        capacity_factor: ``None`` = dropless. With a number c, each expert takes at most
            ``C = ceil(S·k·c/E)`` assignments per routing group of S real tokens, first choices before
            second choices; overflow is dropped (that slot contributes 0, the residual carries the
            token) and counted in metrics. For ``router="expert_choice"`` it is the router's own
            capacity factor (default 2).
        capacity_multiple_of: round C up to a multiple of this (V-MoE uses 4; default 1 = no rounding).
        capacity: an absolute capacity instead of a ratio: each expert takes at most this many
            assignments per routing group, served in the same order (Switch Transformers' ``expert_capacity``
            per sequence: ``capacity=C, group_size="sequence"``). Exclusive with ``capacity_factor``.
        group_size: route in groups of this many consecutive tokens: capacity *and* the balancing
            losses are per group, the losses averaged over groups (V-MoE / GShard). When T is not a
            multiple, the last group is smaller (padded with masked tokens).
            ``None`` = the whole batch is one group; for ``router="soft"`` it is the number of tokens that
            share slots (default: the sequence length ``x.shape[-2]`` for inputs with 3+ dims).
            ``"sequence"`` = one group per sequence of ``x.shape[-2]`` tokens (inputs with 3+ dims).
        batch_priority: Batch Priority Routing — serve tokens by descending raw top-1 router
            probability instead of token order (needs a capacity).
        num_shared_experts / shared_hidden_dim: dense experts applied to every token, added to the output.
        shared_gate: scale the shared experts' output by ``sigmoid(x w)`` with a learned (D,) ``w``
            (``self.shared_gate``; Qwen2-MoE, Qwen3-Next).
        gate_input: apply the combine weight to the expert's *input* instead of its output,
            ``Σ_k E_k(w_k x)`` (Llama-4); the same as output-side gating only for linear experts.
        expert_options: extra keywords for a built-in expert bank (e.g. GLU ``bias``, ``alpha``,
            ``limit``, ``up_offset``: see :class:`~moekit.experts.GLUExperts`).
        w_importance, w_load, w_switch, w_z: loss coefficients (None = the router family's default).
        router_options: extra keywords for the router (e.g. ``{"noise_std": "1/E", "renormalize": False}``);
            unknown names raise a ``ValueError`` listing the valid ones.
        dispatch: ``"sorted"`` (local grouped-matmul dispatcher, default), ``"reference"`` (dense oracle,
            for tests) or a :class:`~moekit.dispatch.TokenDispatcher` instance (e.g. all-to-all).
        balance_group: a ``torch.distributed`` process group: the routing statistics are summed over it
            before the losses are formed (global-batch balancing). ``None`` = per batch.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int | None = None, *,
                 router: str | Router = "topk", expert: str | list[nn.Module] | Callable[[], nn.Module] = "glu",
                 capacity_factor: float | None = None, capacity_multiple_of: int = 1, batch_priority: bool = False,
                 group_size: int | None = None, num_shared_experts: int = 0, shared_hidden_dim: int | None = None,
                 activation: str | None = None, bias: bool = False, dispatch: str | TokenDispatcher = "sorted",
                 router_options: dict[str, Any] | None = None, w_importance: float | None = None,
                 w_load: float | None = None, w_switch: float | None = None, w_z: float | None = None,
                 balance_group=None, capacity: int | None = None, shared_gate: bool = False,
                 gate_input: bool = False, expert_options: dict[str, Any] | None = None):
        super().__init__()
        for name, v in (("dim", dim), ("hidden_dim", hidden_dim), ("num_experts", num_experts)):
            _positive_int(name, v)
        if isinstance(dispatch, str):
            if dispatch not in DISPATCHERS:
                raise ValueError(f"dispatch: unknown {dispatch!r}; choose one of {sorted(DISPATCHERS)} or a "
                                 "TokenDispatcher instance")
            self.dispatcher: TokenDispatcher = DISPATCHERS[dispatch]()
        elif isinstance(dispatch, TokenDispatcher):
            self.dispatcher = dispatch
        else:
            raise TypeError(f"dispatch: expected a name {sorted(DISPATCHERS)} or a TokenDispatcher, got "
                            f"{type(dispatch).__name__}")
        if not isinstance(num_shared_experts, int) or num_shared_experts < 0:
            raise ValueError(f"num_shared_experts: must be a non-negative int, got {num_shared_experts!r}")
        _check_multiple(capacity_multiple_of)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.capacity_multiple_of = capacity_multiple_of
        self.balance_group = balance_group
        self.ep = None          # expert-parallel placement (moekit.parallel.expert_parallel sets it)

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
            if ROUTERS[router].kind == "expert_choice" and capacity_factor is not None:
                options.setdefault("capacity_factor", capacity_factor)
            # top_k=None leaves each family its own default (2 for top-k families, 1 for switch).
            self.router = build_router(router, dim, num_experts, top_k, **options)
        else:
            raise TypeError(f"router: expected a router name {sorted(ROUTERS)} or a Router, got "
                            f"{type(router).__name__}")
        self.top_k = self.router.top_k
        self.kind = self.router.kind                      # declared by the router, never by class name

        # --- capacity and groups --------------------------------------------------------------------
        self.batch_priority = False
        self.capacity_factor: float | None = None
        if capacity_factor is not None and self.kind != "expert_choice":
            self.set_capacity_factor(capacity_factor)
        self.capacity: int | None = None
        if capacity is not None:
            _positive_int("capacity", capacity)
            if capacity_factor is not None:
                raise ValueError("capacity: give either capacity (absolute) or capacity_factor (a ratio), not both")
            if self.kind != "token_choice" or not self.router.supports_capacity:
                raise ValueError(f"capacity: needs a token-choice router that supports capacity; "
                                 f"{type(self.router).__name__} makes {self.kind} decisions")
            self.capacity = capacity
        if group_size == "sequence":
            if self.kind == "expert_choice":
                raise ValueError("group_size: expert-choice routing picks tokens from the whole batch; use None")
        elif group_size is not None:
            _positive_int("group_size", group_size)
            if self.kind == "expert_choice":
                raise ValueError("group_size: expert-choice routing picks tokens from the whole batch; use None")
        self.group_size = group_size
        self.set_batch_priority(bool(batch_priority))

        # --- experts ------------------------------------------------------------------------------
        expert_opts: dict[str, Any] = {}
        if isinstance(expert, str):
            if activation is not None:
                expert_opts["activation"] = activation
            if bias:
                expert_opts["bias"] = bias
            expert_opts.update(expert_options or {})
        elif expert_options:
            raise ValueError("expert_options: only for the built-in expert banks ('mlp', 'glu')")
        if not isinstance(gate_input, bool) or (gate_input and self.kind != "token_choice"):
            raise ValueError(f"gate_input: a bool, True only for token-choice routers; got {gate_input!r} "
                             f"with {self.kind} routing")
        self.gate_input = gate_input
        self.experts: ExpertBank = build_experts(expert, num_experts, dim, hidden_dim, **expert_opts)
        self.shared: ExpertBank | None = None
        if num_shared_experts > 0:
            kind = expert if isinstance(expert, str) else "mlp"
            shared_h = (shared_hidden_dim or hidden_dim) * num_shared_experts
            self.shared = build_experts(kind, 1, dim, shared_h, **expert_opts)
        self.shared_gate: nn.Linear | None = None
        if shared_gate:
            if self.shared is None:
                raise ValueError("shared_gate: needs num_shared_experts > 0")
            self.shared_gate = nn.Linear(dim, 1, bias=False)

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int | None = None, *, noise_std: float = 0.0,
                   generator: torch.Generator | None = None, **moe_kwargs) -> "MoE":
        """Sparse upcycling (Komatsuzaki et al. 2022): a layer whose every expert starts as a copy of
        the dense ``mlp``.

        ``mlp`` is either ``nn.Sequential(Linear, activation, Linear)`` (→ ``expert="mlp"``, biases
        copied) or a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` Linear layers and an
        activation ``act_fn`` or ``activation_fn`` (``LlamaMLP``, ``Qwen2MLP``, … → ``expert="glu"``).
        Activations: ``nn.SiLU``, ``nn.GELU`` (exact), ``nn.ReLU``, ``nn.Tanh``, ``nn.Identity``.
        ``noise_std`` > 0 adds Gaussian noise of ``noise_std · std(W)`` to each copy (from ``generator``).
        The router is freshly initialised; with a router whose top-k weights sum to 1 (``"topk"``, the
        default, renormalises) the new layer computes exactly the dense MLP at initialisation.
        ``moe_kwargs`` go to :class:`MoE` (``router``, ``capacity_factor``, …).
        """
        if not isinstance(noise_std, (int, float)) or isinstance(noise_std, bool) or noise_std < 0:
            raise ValueError(f"noise_std: must be a non-negative number, got {noise_std!r}")
        glu_names = ("gate_proj", "up_proj", "down_proj")
        if all(isinstance(getattr(mlp, n, None), nn.Linear) for n in glu_names):
            gate, up, down = (getattr(mlp, n) for n in glu_names)
            act_mod = getattr(mlp, "act_fn", None) or getattr(mlp, "activation_fn", None)
            kind = "glu"
            dim, hidden = gate.in_features, gate.out_features
            has_bias = gate.bias is not None
            w_in = torch.cat([gate.weight, up.weight], 0).t()                     # (D, 2H)
            w_out = down.weight.t()                                              # (H, D)
            b_in = torch.cat([gate.bias, up.bias]) if has_bias else None
            b_out = down.bias if has_bias else None
        elif isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear) and \
                isinstance(mlp[2], nn.Linear):
            first, act_mod, second = mlp
            kind = "mlp"
            dim, hidden = first.in_features, first.out_features
            has_bias = first.bias is not None
            if has_bias != (second.bias is not None):
                raise ValueError("mlp: both Linear layers must have biases, or neither")
            w_in, w_out = first.weight.t(), second.weight.t()
            b_in, b_out = first.bias, second.bias
        else:
            raise TypeError(f"mlp: expected nn.Sequential(Linear, activation, Linear) or a gated MLP with "
                            f"gate_proj/up_proj/down_proj Linear layers, got {type(mlp).__name__}")
        activation = _activation_name(act_mod)
        moe_kwargs.setdefault("expert", kind)
        if moe_kwargs["expert"] != kind:
            raise ValueError(f"expert: the dense mlp is a {kind!r} network; got expert={moe_kwargs['expert']!r}")
        layer = cls(dim, hidden, num_experts, top_k, activation=activation, bias=has_bias, **moe_kwargs)
        layer.to(device=w_in.device, dtype=w_in.dtype)
        experts = layer.experts
        names = ("w_in", "w_out", "b_in", "b_out") if kind == "glu" else ("w1", "w2", "b1", "b2")
        with torch.no_grad():
            for name, src in zip(names, (w_in, w_out, b_in, b_out)):
                if src is None:
                    continue
                dst = getattr(experts, name)
                dst.copy_(src.detach().expand_as(dst))
                if noise_std > 0:
                    noise = torch.randn(dst.shape, generator=generator, device=dst.device, dtype=dst.dtype)
                    dst.add_(noise * noise_std * src.detach().float().std().to(dst.dtype))
        return layer

    @property
    def token_choice(self) -> bool:
        return self.kind == "token_choice"

    @property
    def soft(self) -> bool:
        return self.kind == "soft"

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, kind={self.kind}, capacity_factor={self.capacity_factor}, "
                f"group_size={self.group_size}, dispatcher={type(self.dispatcher).__name__}")

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Change the capacity ratio, e.g. at evaluation time (V-MoE evaluates at several c)."""
        if capacity_factor is not None:
            expert_capacity(1, 1, 1, capacity_factor)            # validates the value
            if not self.router.supports_capacity:
                raise ValueError(f"capacity_factor: {type(self.router).__name__} ({self.kind} routing) drops "
                                 "nothing and takes no capacity; use None")
        elif self.batch_priority:
            raise ValueError("capacity_factor: batch_priority needs a capacity; disable it first")
        self.capacity_factor = capacity_factor

    def set_batch_priority(self, batch_priority: bool) -> None:
        """Switch Batch Priority Routing on or off (it needs a capacity and a token-choice router)."""
        if not isinstance(batch_priority, bool):
            raise TypeError(f"batch_priority: expected a bool, got {type(batch_priority).__name__}")
        if batch_priority and ((self.capacity_factor is None and getattr(self, "capacity", None) is None)
                               or not self.token_choice):
            raise ValueError("batch_priority: needs capacity_factor and a token-choice router")
        self.batch_priority = batch_priority

    # ------------------------------------------------------------------------------------------
    def _check_input(self, x: Tensor, mask: Tensor | None) -> Tensor | None:
        if not isinstance(x, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.dim:
            raise ValueError(f"x: last dimension must be dim={self.dim}, got shape {tuple(x.shape)}")
        param = next(self.experts.parameters(), None)
        if param is not None and x.dtype != param.dtype and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x: dtype {x.dtype} does not match the layer's parameters ({param.dtype}); cast "
                            "the input or the layer (layer.to(dtype)), or run under torch.autocast")
        if mask is None:
            return None
        if not isinstance(mask, Tensor):
            raise TypeError(f"mask: expected a bool tensor broadcastable to {tuple(x.shape[:-1])}, got "
                            f"{type(mask).__name__}")
        try:
            mask = torch.broadcast_to(mask, x.shape[:-1])
        except RuntimeError:
            raise ValueError(f"mask: shape {tuple(mask.shape)} does not broadcast to x.shape[:-1] = "
                             f"{tuple(x.shape[:-1])}") from None
        if mask.dtype != torch.bool:
            raise TypeError(f"mask: expected dtype torch.bool (True = real token), got {mask.dtype}")
        return mask.reshape(-1).to(x.device)

    def _group_size(self, x: Tensor) -> int | None:
        if self.group_size == "sequence":
            if x.dim() < 3:
                raise ValueError(f"x: group_size='sequence' needs inputs of shape (..., sequence, dim), got "
                                 f"{tuple(x.shape)}")
            return x.shape[-2]
        if self.kind == "soft" and self.group_size is None:
            return x.shape[-2] if x.dim() > 2 else None       # soft: the tokens of one sequence share slots
        return self.group_size

    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> MoEOutput:
        mask_T = self._check_input(x, mask)
        x_TD = x.reshape(-1, self.dim)
        group_size = self._group_size(x)
        T = x_TD.shape[0]
        if group_size is not None and T <= group_size:
            group_size = None                        # one (possibly partial) group: no padding needed
        pad = (-T) % group_size if group_size else 0
        if pad and self.kind != "expert_choice":   # a last, partial group: pad it with masked tokens
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, self.dim)])
            real_T = torch.ones(T, dtype=torch.bool, device=x.device) if mask_T is None else mask_T
            mask_T = torch.cat([real_T, torch.zeros(pad, dtype=torch.bool, device=x.device)])
        d = self.router(x_TD, mask_T, generator=generator, group_size=group_size,     # router
                        stats_group=self.balance_group)
        if d.kind == "soft":
            y_TD, metrics = self._soft(x_TD, d, mask_T)
        else:
            y_TD, metrics = self._sparse(x_TD, d, mask_T, group_size)
        if mask_T is not None:                                        # masked tokens: output exactly 0
            y_TD = torch.where(mask_T[:, None], y_TD, torch.zeros_like(y_TD))
        if self.shared is not None:
            counts = torch.full((1,), x_TD.shape[0], dtype=torch.long, device=x.device)
            shared_TD = self.shared(x_TD, counts)
            if self.shared_gate is not None:
                shared_TD = shared_TD * torch.sigmoid(self.shared_gate(x_TD.to(shared_TD.dtype)))
            if mask_T is not None:
                shared_TD = torch.where(mask_T[:, None], shared_TD, torch.zeros_like(shared_TD))
            y_TD = y_TD + shared_TD
        if pad:
            y_TD = y_TD[:T]
        metrics.update(d.metrics)
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), d.aux_loss, metrics, d.stats)

    def _sparse(self, x_TD: Tensor, d: RoutingDecision, mask_T: Tensor | None, group_size: int | None):
        T, E = x_TD.shape[0], self.num_experts
        if d.kind == "expert_choice":          # experts picked real tokens only: nothing to drop
            token_A, expert_A, weight_A = d.assignments()
            a = Assignments(token_A, expert_A, weight_A, T, E, may_skip=False)
            picked_T = torch.zeros(T, dtype=torch.bool, device=x_TD.device).index_fill(0, token_A, True)
            real_T = picked_T.new_ones(T) if mask_T is None else mask_T
            skipped = (real_T & ~picked_T).sum()
            dropped, total = 0, token_A.numel()
        else:
            ids_TK = d.expert_ids
            K = ids_TK.shape[-1]
            keep_TK = None
            if self.capacity_factor is not None:                      # capacity: drop the overflow
                keep_TK = capacity_keep(ids_TK, E, self.capacity_factor, mask_T=mask_T, group_size=group_size,
                                        priority_T=self._priority(d) if self.batch_priority else None,
                                        multiple_of=self.capacity_multiple_of)
            elif self.capacity is not None:                           # absolute capacity per group
                keep_TK = capacity_keep(ids_TK, E, capacity=self.capacity, mask_T=mask_T, group_size=group_size,
                                        priority_T=self._priority(d) if self.batch_priority else None)
            elif mask_T is not None:                                  # padding: never routed
                keep_TK = mask_T[:, None].expand(T, K)
            if keep_TK is not None:
                ids_TK = torch.where(keep_TK, ids_TK, torch.full_like(ids_TK, E))   # id E = not executed
            # Slot-major flat order (all first choices, then all second choices, ...).
            token_A = torch.arange(T, device=x_TD.device).expand(K, T).reshape(-1)
            a = Assignments(token_A, ids_TK.t().reshape(-1), d.weights.t().reshape(-1), T, E,
                            may_skip=keep_TK is not None)
            n_real = T if mask_T is None else mask_T.sum()
            total = n_real * K
            if keep_TK is None:
                dropped, skipped = 0, 0
            else:
                dropped = total - keep_TK.sum()
                real_T = torch.ones(T, dtype=torch.bool, device=x_TD.device) if mask_T is None else mask_T
                skipped = (real_T & ~keep_TK.any(dim=-1)).sum()
        if self.gate_input:          # input-side gating: every assignment is a row E_k(w_k x), weight 1
            x_AD = x_TD.index_select(0, a.token_A) * a.weight_A[:, None].to(x_TD.dtype)
            A = a.token_A.shape[0]
            rows = Assignments(torch.arange(A, device=x_TD.device), a.expert_A, torch.ones_like(a.weight_A), A, E,
                               may_skip=a.may_skip)
            rows_RD, counts_E, state = self.dispatcher.dispatch(x_AD, rows)
            out_AD = self.dispatcher.combine(self.dispatcher.compute(self.experts, rows_RD, counts_E, state), state)
            y_TD = out_AD.new_zeros(T, out_AD.shape[-1]).index_add(0, a.token_A, out_AD)
        else:
            rows_RD, counts_E, state = self.dispatcher.dispatch(x_TD, a)            # dispatch
            out_RD = self.dispatcher.compute(self.experts, rows_RD, counts_E, state)  # experts
            y_TD = self.dispatcher.combine(out_RD, state)                         # combine
        load_E = expert_counts(a.expert_A, E)
        metrics = routing_metrics(d, load_E, dropped, total, skipped, T, mask_T)
        return y_TD, metrics

    @staticmethod
    def _priority(d: RoutingDecision) -> Tensor:
        """Batch Priority Routing key: the router's raw top-1 gate (V-MoE sorts by it), whatever the
        renormalisation of the combine weights."""
        if d.priority is not None:
            return d.priority
        return d.probs.detach().max(dim=-1).values

    def _soft(self, x_TD: Tensor, d: RoutingDecision, mask_T: Tensor | None):
        """Soft MoE: slots (mixtures of a group's tokens) go through the dispatcher as rows already
        grouped by expert; the outputs are mixed back into tokens by the combine weights."""
        E, S, D = self.num_experts, self.router.slots_per_expert, self.dim
        dispatch_GNZ, combine_GNZ = d.slot_dispatch, d.slot_combine
        G, N = dispatch_GNZ.shape[:2]
        x_GND = x_TD.reshape(G, N, D)
        param = next(self.experts.parameters(), None)
        cdt = x_TD.dtype if param is None else compute_dtype(x_TD, param)
        slots_GZD = torch.einsum("gnz,gnd->gzd", dispatch_GNZ.to(cdt), x_GND.to(cdt))
        # Rows grouped by expert: (G, E, S, D) -> (E, G, S, D) -> (E·G·S, D), G·S rows per expert.
        rows = slots_GZD.view(G, E, S, D).permute(1, 0, 2, 3).reshape(E * G * S, D)
        R = rows.shape[0]
        a = Assignments(torch.arange(R, device=x_TD.device),
                        torch.arange(E, device=x_TD.device).repeat_interleave(G * S),
                        torch.ones(R, dtype=rows.dtype, device=x_TD.device), R, E)
        rows_RD, counts_E, state = self.dispatcher.dispatch(rows, a)
        out_RD = self.dispatcher.compute(self.experts, rows_RD, counts_E, state)
        out_ZD = self.dispatcher.combine(out_RD, state)
        Dout = out_ZD.shape[-1]
        out_GZD = out_ZD.view(E, G, S, Dout).permute(1, 0, 2, 3).reshape(G, E * S, Dout)
        y_GND = torch.einsum("gnz,gzd->gnd", combine_GNZ.to(out_GZD.dtype), out_GZD)
        slots_E = torch.full((E,), G * S, dtype=torch.float32, device=x_TD.device)
        metrics = routing_metrics(d, slots_E, 0, 0, 0, x_TD.shape[0], mask_T)
        return y_GND.reshape(x_TD.shape[0], Dout), metrics
