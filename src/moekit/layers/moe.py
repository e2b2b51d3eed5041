"""The sparse Mixture-of-Experts layer: router → plan → dispatch → experts → combine.

The layer composes built pieces — a router, an expert bank, a capacity policy, optional shared
experts and a dispatcher — described as a whole by one :class:`~moekit.config.MoEConfig`. Its forward
has no branch on the kind of routing: the router returns a plan of its kind
(:mod:`moekit.routing.plans`) and the plan runs itself.

Legend: see ``moekit/__init__.py`` (T tokens, D model dim, H expert hidden dim, E experts, K experts per
token, C capacity, N tokens per group).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import torch
from torch import Tensor, nn

from .. import _validation as V
from ..config import CapacityConfig, ExpertsConfig, MoEConfig, RouterConfig, SharedConfig
from ..dispatch import DISPATCHERS, CapacityPolicy, TokenDispatcher
from ..experts import ExpertBank, InputGated, build_experts
from ..experts.bank import ACTIVATIONS, EXPERTS
from ..routing import ROUTERS, Router, router_from_config
from ..types import MoEOutput
from .shared import SharedExperts


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



def _build_dispatcher(dispatch: str | TokenDispatcher) -> TokenDispatcher:
    if isinstance(dispatch, TokenDispatcher):
        return dispatch
    if not isinstance(dispatch, str):
        raise TypeError(f"dispatch: expected a name {sorted(DISPATCHERS)} or a TokenDispatcher, got "
                        f"{type(dispatch).__name__}")
    return DISPATCHERS[V.choice("dispatch", dispatch, sorted(DISPATCHERS))]()


class MoE(nn.Module):
    """Sparse MoE layer, drop-in for an MLP block: ``MoE(dim, hidden_dim, num_experts, top_k)(x)``.

    ``forward(x, mask=None, *, generator=None)`` takes ``x`` of shape (..., dim) and returns
    ``MoEOutput(y, aux_loss, metrics, stats)``: ``y`` has x's shape; ``aux_loss`` is the router's
    weighted balancing loss (a zero scalar when no loss applies); ``metrics`` holds detached per-expert
    statistics and the unweighted losses; ``stats`` the (differentiable) routing statistics the loss
    was formed from — add them over micro-batches and form the loss once with
    ``layer.router.balance_losses(stats)`` for global-batch balancing.

    Two ways to build one: ``MoE.from_config(MoEConfig(...))``, or the keywords below (they go through
    the same config). ``layer.config`` is the complete configuration of the built layer.

    Args:
        router: a name from :data:`moekit.routing.ROUTERS` (``"topk"``, ``"noisy_topk"``, ``"switch"``,
            ``"vmoe"``, ``"softmax"``, ``"expert_choice"``, ``"soft"``, ``"sigmoid"``, ``"scored"``) or a
            built :class:`~moekit.routing.Router`.
        expert: ``"glu"`` (SwiGLU), ``"mlp"`` (Linear–act–Linear), a built
            :class:`~moekit.experts.ExpertBank`, a list of E ``nn.Module`` or a factory returning one
            (slower per-expert path).
        top_k: experts per token (default: the router family's; the dense softmax router uses all E;
            soft and expert-choice routing take none).
        capacity_factor: ``None`` = dropless. With a number c, each expert takes at most
            ``C = ceil(N·k·c/E)`` assignments per routing group of N real tokens (capped at N), first
            choices before second choices; overflow is dropped (that slot contributes 0, the residual
            carries the token) and counted in metrics. For ``router="expert_choice"`` it is passed on
            as that router's own ``capacity_factor`` (tokens per expert; default 2).
        capacity_multiple_of: round C up to a multiple of this (V-MoE uses 4; default 1 = no rounding).
        capacity: an absolute capacity instead of a ratio: each expert takes at most this many
            assignments per routing group, served in the same order (Switch Transformers'
            ``expert_capacity`` per sequence: ``capacity=C, group_size="sequence"``).
        group_size: route in groups of this many consecutive tokens: capacity *and* the balancing
            losses are per group, the losses averaged over the groups that hold a real token (V-MoE /
            GShard). When T is not a multiple, the last group is padded with masked tokens. ``None`` =
            one group (soft routing: the tokens of one sequence share slots, ``x.shape[-2]``);
            ``"sequence"`` = one group per sequence of ``x.shape[-2]`` tokens.
        batch_priority: Batch Priority Routing — serve tokens by descending raw top-1 router
            probability instead of token order (needs a capacity).
        num_shared_experts / shared_hidden_dim / shared_gate: shared experts
            (:class:`~moekit.layers.shared.SharedExperts`), optionally gated by ``sigmoid(x w)``.
        gate_input: the combine weight scales each expert's *input*, ``Σ_k E_k(w_k x)`` (Llama-4;
            :func:`~moekit.experts.input_gated` banks).
        activation, bias, expert_options: options of the built-in expert banks (e.g. GLU ``alpha``,
            ``limit``, ``up_offset``: see :class:`~moekit.experts.GLUExperts`).
        w_importance, w_load, w_switch, w_z: loss coefficients (None = the router family's default);
            finite and non-negative.
        router_options: extra keywords for the router (e.g. ``{"noise_std": "1/E", "renormalize": False}``);
            unknown names raise a ``ValueError`` listing the valid ones.
        dispatch: ``"sorted"`` (local grouped-matmul dispatcher, default), ``"reference"`` (dense oracle,
            for tests) or a :class:`~moekit.dispatch.TokenDispatcher` instance (e.g. all-to-all).
        balance_group: a ``torch.distributed`` process group: the routing statistics are summed over it
            before the losses are formed (global-batch balancing). ``None`` = per batch.
    """

    def __init__(self, dim: int, hidden_dim: int, num_experts: int, top_k: int | None = None, *,
                 router: str | Router = "topk", expert: str | ExpertBank | list[nn.Module] | Callable[[], nn.Module] = "glu",
                 capacity_factor: float | None = None, capacity_multiple_of: int = 1, batch_priority: bool = False,
                 group_size: int | str | None = None, num_shared_experts: int = 0, shared_hidden_dim: int | None = None,
                 activation: str | None = None, bias: bool = False, dispatch: str | TokenDispatcher = "sorted",
                 router_options: dict[str, Any] | None = None, w_importance: float | None = None,
                 w_load: float | None = None, w_switch: float | None = None, w_z: float | None = None,
                 balance_group=None, capacity: int | None = None, shared_gate: bool = False,
                 gate_input: bool = False, expert_options: dict[str, Any] | None = None):
        super().__init__()
        # --- the router: a name (through its config) or a built router ------------------------------
        options = dict(router_options or {})
        options.update({n: w for n, w in (("w_importance", w_importance), ("w_load", w_load),
                                          ("w_switch", w_switch), ("w_z", w_z)) if w is not None})
        if isinstance(router, Router):
            if options:
                raise ValueError("router_options/w_*: configure a Router instance directly, not through MoE")
            if router.num_experts != num_experts or router.dim != dim:
                raise ValueError(f"router: instance has dim={router.dim}, num_experts={router.num_experts}; "
                                 f"the layer has dim={dim}, num_experts={num_experts}")
            router_cfg = router.config()
        elif isinstance(router, str):
            if router not in ROUTERS:
                raise ValueError(f"router: unknown router {router!r}; choose one of {sorted(ROUTERS)}")
            if ROUTERS[router].kind == "expert_choice" and capacity_factor is not None:
                options.setdefault("capacity_factor", capacity_factor)     # the router's own capacity
                capacity_factor = None
            router_cfg = RouterConfig(router, top_k, options)
        else:
            raise TypeError(f"router: expected a router name {sorted(ROUTERS)} or a Router, got {type(router).__name__}")
        # --- the experts: a kind name (through its config) or built modules ---------------------------
        V.flag("gate_input", gate_input)
        if isinstance(expert, str):
            expert_opts = dict(expert_options or {})
            if activation is not None:
                expert_opts["activation"] = activation
            if bias:
                expert_opts["bias"] = bias
            experts_cfg = ExpertsConfig(expert, expert_opts, gate_on_input=gate_input)
        elif expert_options or activation is not None or bias:
            raise ValueError("expert_options/activation/bias: only for the built-in expert banks ('mlp', 'glu')")
        else:
            experts_cfg = ExpertsConfig("modules", {}, gate_on_input=gate_input)
        config = MoEConfig(dim, hidden_dim, num_experts, router_cfg, experts_cfg,
                           CapacityConfig(capacity_factor, capacity, capacity_multiple_of, batch_priority),
                           SharedConfig(num_shared_experts, shared_hidden_dim, shared_gate), group_size)
        self._assemble(config, router=router if isinstance(router, Router) else None,
                       experts=None if isinstance(expert, str) else expert, dispatch=dispatch, balance_group=balance_group)

    @classmethod
    def from_config(cls, config: MoEConfig, *, dispatch: str | TokenDispatcher = "sorted", balance_group=None) -> "MoE":
        """Build the layer a :class:`~moekit.config.MoEConfig` describes (registered routers, built-in
        expert banks). ``MoE.from_config(layer.config)`` builds a layer that computes what ``layer``
        computes (with fresh weights)."""
        if not isinstance(config, MoEConfig):
            raise TypeError(f"config: expected a MoEConfig, got {type(config).__name__}")
        layer = cls.__new__(cls)
        nn.Module.__init__(layer)
        layer._assemble(config, dispatch=dispatch, balance_group=balance_group)
        return layer

    def _assemble(self, config: MoEConfig, *, router: Router | None = None, experts=None,
                  dispatch: str | TokenDispatcher = "sorted", balance_group=None) -> None:
        """Build every piece from ``config`` (``router``/``experts``: pieces built by the caller) and
        check that they fit together, before any of them is attached."""
        dim, hidden, E = config.dim, config.hidden_dim, config.num_experts
        router = router_from_config(config.router, dim, E) if router is None else router
        ecfg = config.experts
        if experts is None:
            if ecfg.kind not in EXPERTS:
                raise ValueError(f"expert: {ecfg.kind!r} cannot be built from a configuration; choose one of "
                                 f"{sorted(EXPERTS)} or pass the expert modules")
            experts = build_experts(ecfg.kind, E, dim, hidden, gate_on_input=ecfg.gate_on_input, **ecfg.options)
        elif not isinstance(experts, ExpertBank):
            experts = build_experts(experts, E, dim, hidden, gate_on_input=ecfg.gate_on_input)
        elif ecfg.gate_on_input and not isinstance(experts, InputGated):
            raise ValueError("gate_input: a built bank takes the combine weight on its input only if built so: "
                             "use moekit.experts.input_gated(BankClass)(...)")
        if experts.num_experts != E or experts.dim != dim:
            raise ValueError(f"expert: bank has num_experts={experts.num_experts}, dim={experts.dim}; the layer has "
                             f"num_experts={E}, dim={dim}")
        if ecfg.gate_on_input and router.kind == "soft":
            raise ValueError("gate_input: soft routing mixes tokens into slots with no per-row combine weight; "
                             "use a token-choice or expert-choice router")
        cap = config.capacity
        if not cap.dropless and (router.kind != "token_choice" or not router.supports_capacity):
            raise ValueError(f"capacity_factor/capacity: {type(router).__name__} ({router.kind} routing) drops nothing "
                             "and takes no capacity; use None")
        if config.group_size is not None and router.kind == "expert_choice":
            raise ValueError("group_size: expert-choice routing picks tokens from the whole batch; use None")
        shared = None
        if config.shared.num_experts > 0:
            kind = ecfg.kind if ecfg.kind in EXPERTS else "mlp"
            units = (config.shared.hidden_dim or hidden) * config.shared.num_experts
            bank = build_experts(kind, 1, dim, units, **(ecfg.options if ecfg.kind in EXPERTS else {}))
            shared = SharedExperts(bank, config.shared)
        self.dim, self.hidden_dim, self.num_experts = dim, hidden, E
        self.group_size = config.group_size
        self.router, self.experts, self.shared = router, experts, shared
        self.capacity = CapacityPolicy(cap)
        self.dispatcher = _build_dispatcher(dispatch)
        self.balance_group = balance_group

    # ---- configuration ---------------------------------------------------------------------------
    @property
    def config(self) -> MoEConfig:
        """The complete configuration of the layer as built (assembled from its pieces)."""
        return MoEConfig(self.dim, self.hidden_dim, self.num_experts, self.router.config(), self.experts.config(),
                         self.capacity.config, SharedConfig() if self.shared is None else self.shared.config(),
                         self.group_size)

    @property
    def kind(self) -> str:
        """The kind of routing decision the router makes (``token_choice``, ``expert_choice``, ``soft``)."""
        return self.router.kind

    @property
    def top_k(self) -> int:
        return self.router.top_k

    @property
    def capacity_factor(self) -> float | None:
        return self.capacity.config.factor

    @property
    def batch_priority(self) -> bool:
        return self.capacity.config.batch_priority

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Change the capacity ratio, e.g. at evaluation time (V-MoE evaluates at several c)."""
        cfg = dataclasses.replace(self.capacity.config, factor=capacity_factor,
                                  absolute=None if capacity_factor is not None else self.capacity.config.absolute)
        if not cfg.dropless and (self.kind != "token_choice" or not self.router.supports_capacity):
            raise ValueError(f"capacity_factor: {type(self.router).__name__} ({self.kind} routing) drops "
                             "nothing and takes no capacity; use None")
        self.capacity = CapacityPolicy(cfg)

    def set_batch_priority(self, batch_priority: bool) -> None:
        """Switch Batch Priority Routing on or off (it needs a capacity)."""
        if not isinstance(batch_priority, bool):
            raise TypeError(f"batch_priority: expected a bool, got {type(batch_priority).__name__}")
        self.capacity = CapacityPolicy(dataclasses.replace(self.capacity.config, batch_priority=batch_priority))

    def extra_repr(self) -> str:
        return (f"dim={self.dim}, hidden_dim={self.hidden_dim}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, kind={self.kind}, capacity={self.capacity}, "
                f"group_size={self.group_size}, dispatcher={type(self.dispatcher).__name__}")

    # ---- forward -----------------------------------------------------------------------------------
    def forward(self, x: Tensor, mask: Tensor | None = None, *,
                generator: torch.Generator | None = None) -> MoEOutput:
        mask_T = self._check_input(x, mask)
        T = x.reshape(-1, self.dim).shape[0]
        x_TD, mask_T, group_size = self._routing_groups(x, mask_T)       # (T + padding, D)
        plan = self.router(x_TD, mask_T, generator=generator, group_size=group_size,   # router -> plan
                           stats_group=self.balance_group)
        y_TD, metrics = plan.run(x_TD, self.experts, self.dispatcher, self.capacity,  # dispatch, experts, combine
                                 mask_T=mask_T, group_size=group_size)
        if self.shared is not None:
            y_TD = y_TD + self.shared(x_TD)
        if mask_T is not None:                                     # masked tokens: output exactly 0
            y_TD = torch.where(mask_T[:, None], y_TD, torch.zeros_like(y_TD))
        y_TD = y_TD[:T]
        return MoEOutput(y_TD.view(*x.shape[:-1], y_TD.shape[-1]), plan.aux_loss, {**metrics, **plan.metrics},
                         plan.stats)

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

    def _routing_groups(self, x: Tensor, mask_T: Tensor | None) -> tuple[Tensor, Tensor | None, int | None]:
        """Flatten ``x`` to tokens, pad the last routing group with masked tokens, and zero the
        masked tokens (whatever they hold — even NaN — counts nowhere)."""
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        group_size = self.group_size
        if group_size == "sequence" or (group_size is None and self.router.groups_by_sequence):
            if x.dim() < 3:
                if group_size == "sequence":
                    raise ValueError(f"x: group_size='sequence' needs inputs of shape (..., sequence, dim), got "
                                     f"{tuple(x.shape)}")
                group_size = None
            else:
                group_size = x.shape[-2]
        if group_size is not None and T <= group_size:
            group_size = None                        # one (possibly partial) group: no padding needed
        pad = (-T) % group_size if group_size else 0
        if pad:
            x_TD = torch.cat([x_TD, x_TD.new_zeros(pad, self.dim)])
            real_T = torch.ones(T, dtype=torch.bool, device=x.device) if mask_T is None else mask_T
            mask_T = torch.cat([real_T, torch.zeros(pad, dtype=torch.bool, device=x.device)])
        if mask_T is not None:
            x_TD = torch.where(mask_T[:, None], x_TD, torch.zeros_like(x_TD))
        return x_TD, mask_T, group_size

    @classmethod
    def from_dense(cls, mlp: nn.Module, num_experts: int, top_k: int | None = None, *, noise_std: float = 0.0,
                   generator: torch.Generator | None = None, **moe_kwargs) -> "MoE":
        """Sparse upcycling (Komatsuzaki et al. 2022): a layer whose every expert starts as a copy of
        the dense ``mlp``.

        ``mlp`` is either ``nn.Sequential(Linear, activation, Linear)`` (→ ``expert="mlp"``, biases
        copied) or a gated MLP with ``gate_proj``/``up_proj``/``down_proj`` Linear layers and an
        activation ``act_fn`` or ``activation_fn`` (``LlamaMLP``, ``Qwen2MLP``, … → ``expert="glu"``).
        Activations: ``nn.SiLU``, ``nn.GELU`` (exact), ``nn.ReLU``, ``nn.Tanh``, ``nn.Identity``.
        ``noise_std`` > 0 adds Gaussian noise of ``noise_std`` times the weight's std to each copy (from ``generator``).
        The router is freshly initialised; with a router whose top-k weights sum to 1 (``"topk"``, the
        default, renormalises) the new layer computes exactly the dense MLP at initialisation.
        ``moe_kwargs`` go to :class:`MoE` (``router``, ``capacity_factor``, …).
        """
        V.non_negative_number("noise_std", noise_std)
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

