"""Expert banks: E expert networks stored as stacked weights and run with grouped matmuls.

Legend (the package's, ``moekit/__init__.py``): R rows handed to the experts (sorted by expert), E experts,
T tokens, D model dim, H expert hidden dim.

Every bank has these entry points:
  * ``forward(x_RD, counts_E)`` — the fast path: rows already sorted by expert, ``counts_E`` rows each;
  * ``forward_weighted(x_RD, counts_E, weight_R)`` — the same with each row's combine weight applied
    (to the output; :class:`InputGated` banks apply it to the input): what dispatchers call;
  * ``forward_dense(x_TD) -> y_ETD`` / ``forward_dense_weighted(x_TD, combine_TE) -> y_TD`` — every
    expert on every token; only the reference dispatch (the test oracle) uses them.
Stacked weights are read through :func:`local`, so a bank whose weights are DTensors sharded over the
experts (expert parallelism) computes on its own shard.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from ..config import ExpertsConfig, Recorded
from .grouped_mm import grouped_mm

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu, "relu": F.relu, "silu": F.silu, "tanh": torch.tanh, "identity": lambda t: t,
}


def _activation(name: str) -> Callable[[Tensor], Tensor]:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {name!r}; choose one of {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


def local(w: Tensor) -> Tensor:
    """The part of a weight this process holds: ``w.to_local()`` for a DTensor, ``w`` otherwise."""
    to_local = getattr(w, "to_local", None)
    return w if to_local is None else to_local()


def _act_grad(name: str, g: Tensor) -> Tensor:
    """``act'(g)`` in differentiable operations (the GLU backward under ``create_graph=True``)."""
    if name == "silu":
        s = torch.sigmoid(g)
        return s * (1 + g * (1 - s))
    if name == "gelu":
        return 0.5 * (1 + torch.erf(g * 0.5 ** 0.5)) + g * torch.exp(-0.5 * g * g) * (2 * math.pi) ** -0.5
    if name == "relu":
        return (g > 0).to(g.dtype)
    if name == "tanh":
        return 1 - torch.tanh(g) ** 2
    if name == "identity":
        return torch.ones_like(g)
    raise ValueError(f"activation: no GLU backward for {name!r}; choose one of {sorted(ACTIVATIONS)}")


# ``act(h[:, :H]) * h[:, H:]`` as a custom operator with a backward that writes both halves of ``dh``
# straight into one buffer (slicing + autograd would allocate two zero-padded halves and add them;
# temporaries plus copies would touch every byte twice more — these tensors are tens of MB, so memory
# traffic and page faults, not arithmetic, set their cost). As an opaque operator it also compiles
# under ``torch.compile`` (the in-place ``out=`` kernels on views would not trace).
@torch.library.custom_op("moekit::glu", mutates_args=())
def glu(h_R2H: Tensor, act_name: str) -> Tensor:
    gate, up = h_R2H.chunk(2, dim=-1)
    a = ACTIVATIONS[act_name](gate)
    return a * up if (a is gate or act_name == "identity") else a.mul_(up)   # in place only into a fresh output


@glu.register_fake
def _(h_R2H: Tensor, act_name: str) -> Tensor:
    return h_R2H.new_empty(*h_R2H.shape[:-1], h_R2H.shape[-1] // 2)


@torch.library.custom_op("moekit::glu_backward", mutates_args=())
def _glu_backward(dy_RH: Tensor, h_R2H: Tensor, act_name: str) -> Tensor:
    gate, up = h_R2H.chunk(2, dim=-1)
    H = gate.shape[-1]
    dh = torch.empty_like(h_R2H)
    dgate, dup = dh[:, :H], dh[:, H:]
    if act_name == "silu":              # fused kernels writing into dh: no graph, no copies
        torch.ops.aten.silu_backward.grad_input(dy_RH * up, gate, grad_input=dgate)
        torch.ops.aten.silu.out(gate, out=dup)
        dup.mul_(dy_RH)
    else:                               # the activations' own backward kernels (no autograd in here)
        g_up = dy_RH * up
        a = ACTIVATIONS[act_name](gate)
        if act_name == "gelu":
            dg = torch.ops.aten.gelu_backward(g_up, gate)
        elif act_name == "relu":
            dg = torch.ops.aten.threshold_backward(g_up, gate, 0)
        elif act_name == "tanh":
            dg = torch.ops.aten.tanh_backward(g_up, a)
        elif act_name == "identity":
            dg = g_up
        else:
            raise ValueError(f"activation: no GLU backward for {act_name!r}; choose one of {sorted(ACTIVATIONS)}")
        dgate.copy_(dg)
        torch.mul(dy_RH, a, out=dup)
    return dh


@_glu_backward.register_fake
def _(dy_RH: Tensor, h_R2H: Tensor, act_name: str) -> Tensor:
    return torch.empty_like(h_R2H)


def _glu_setup(ctx, inputs, output):
    h_R2H, act_name = inputs
    ctx.save_for_backward(h_R2H)
    ctx.act_name = act_name


def _glu_bwd(ctx, dy_RH: Tensor):
    (h_R2H,) = ctx.saved_tensors
    if torch.is_grad_enabled():         # backward of a backward (create_graph=True): differentiable ops
        gate, up = h_R2H.chunk(2, dim=-1)
        a = ACTIVATIONS[ctx.act_name](gate)
        return torch.cat([dy_RH * up * _act_grad(ctx.act_name, gate), dy_RH * a], dim=-1), None
    return _glu_backward(dy_RH.contiguous(), h_R2H, ctx.act_name), None


glu.register_autograd(_glu_bwd, setup_context=_glu_setup)


def _row_bias(b_EH: Tensor, counts_E: Tensor, num_rows: int) -> Tensor:
    """Each row's expert bias (rows sorted by expert); padding rows past ``counts_E.sum()`` get 0."""
    group_R = torch.bucketize(torch.arange(num_rows, device=counts_E.device), torch.cumsum(counts_E, 0), right=True)
    return torch.cat([b_EH, b_EH.new_zeros(1, b_EH.shape[-1])]).index_select(0, group_R)


def compute_dtype(x: Tensor, param: Tensor) -> torch.dtype:
    """The dtype experts compute in: autocast's for the input's device when autocast is on, else the
    parameters' (the layer has checked that the input matches them)."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return param.dtype


class ExpertBank(Recorded, nn.Module):
    """E experts. Subclasses implement ``forward`` and ``forward_dense``; the weighted entry points
    apply each row's combine weight to the output."""
    num_experts: int
    dim: int
    # Stacked banks: add the expert weights' gradients straight into an existing ``.grad`` (see
    # ``grouped_mm``); a plain attribute, so it can be switched on a bank built elsewhere (``from_hf``).
    fuse_grad_accumulation: bool = False
    config_exclude = frozenset({"num_experts", "dim", "hidden_dim", "fuse_grad_accumulation"})
    #: the name this bank's kind has in :data:`EXPERTS`
    kind: str = "modules"

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_dense(self, x_TD: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward_weighted(self, x_RD: Tensor, counts_E: Tensor, weight_R: Tensor,
                         valid_R: Tensor | None = None) -> Tensor:
        """``weight_a · expert(x_a)`` for rows sorted by expert; rows where ``valid_R`` is False
        (padding past the last expert, which the kernels may leave undefined) give 0 and pass no
        gradient — they are zeroed *before* the weight multiply, whose gradient reads them."""
        y_RD = self(x_RD, counts_E)
        if valid_R is not None:
            y_RD = torch.where(valid_R[:, None], y_RD, torch.zeros_like(y_RD))
        return y_RD * weight_R[:, None].to(y_RD.dtype)

    def forward_dense_weighted(self, x_TD: Tensor, combine_TE: Tensor) -> Tensor:
        """``y_t = Σ_e combine[t, e] · expert_e(x_t)``, every expert on every token (the oracle)."""
        y_ETD = self.forward_dense(x_TD)
        return torch.einsum("te,etd->td", combine_TE.to(y_ETD.dtype), y_ETD)

    def config(self) -> ExpertsConfig:
        """The bank's configuration: its kind and every constructor option that changes the output."""
        return ExpertsConfig(self.kind, self.init_args)


class MLPExperts(ExpertBank):
    """E two-layer MLPs ``y = act(x W1_e + b1_e) W2_e + b2_e``; W1: (E, D, H), W2: (E, H, D).
    ``fuse_grad_accumulation`` as for :class:`GLUExperts`."""

    kind = "mlp"

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "gelu",
                 bias: bool = False, fuse_grad_accumulation: bool = False):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            V.positive_int(name, v)
        self.fuse_grad_accumulation = V.flag("fuse_grad_accumulation", fuse_grad_accumulation)
        V.flag("bias", bias)
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        self.act = _activation(activation)
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden_dim)) if bias else None
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, drawn independently per expert.
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, bias={self.b1 is not None}")

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        dt = compute_dtype(x_RD, self.w1)
        x_RD = x_RD.to(dt)
        fuse = self.fuse_grad_accumulation
        h_RH = grouped_mm(x_RD, local(self.w1).to(dt), counts_E, fuse_grad_accumulation=fuse)
        if self.b1 is not None:
            h_RH = h_RH + _row_bias(local(self.b1).to(dt), counts_E, x_RD.shape[0])
        y_RD = grouped_mm(self.act(h_RH), local(self.w2).to(dt), counts_E, fuse_grad_accumulation=fuse)
        if self.b2 is not None:
            y_RD = y_RD + _row_bias(local(self.b2).to(dt), counts_E, x_RD.shape[0])
        return y_RD

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        x_TD = x_TD.to(compute_dtype(x_TD, self.w1))
        h_ETH = torch.einsum("td,edh->eth", x_TD, self.w1.to(x_TD.dtype))
        if self.b1 is not None:
            h_ETH = h_ETH + self.b1[:, None]
        y_ETD = torch.einsum("eth,ehd->etd", self.act(h_ETH), self.w2.to(x_TD.dtype))
        if self.b2 is not None:
            y_ETD = y_ETD + self.b2[:, None]
        return y_ETD


class GLUExperts(ExpertBank):
    """E SwiGLU experts ``y = (silu(x Wg_e) ⊙ (x Wu_e)) Wd_e``; gate and up projections are fused
    into one (E, D, 2H) weight (gate columns first, then up) so each token needs one grouped matmul in
    and one out.

    Options for the GLU variants of current models (all off by default):
      * ``bias`` — biases ``b_in`` (E, 2H) and ``b_out`` (E, D) on both projections (GPT-OSS);
      * ``alpha`` — the gate activation becomes ``g · sigmoid(alpha · g)`` (needs ``activation="silu"``;
        GPT-OSS: 1.702, transformers 5.23 GptOssConfig default, checked);
      * ``limit`` — clamp the gate to ``g ≤ limit`` and the up projection to ``[−limit, limit]`` before
        they are combined (GPT-OSS: 7.0, the same source);
      * ``up_offset`` — combine as ``act(g) ⊙ (u + up_offset)`` (GPT-OSS: 1).
    Layouts that interleave gate and up columns (GPT-OSS) are de-interleaved when the weights are loaded.
    ``fuse_grad_accumulation``: add the weight gradients into an existing ``.grad`` inside the backward's
    GEMMs (training loops that keep gradients: ``zero_grad(set_to_none=False)``, micro-batch
    accumulation); autograd hooks on the expert weights then do not run (``experts.grouped_mm``).
    """

    kind = "glu"

    def __init__(self, num_experts: int, dim: int, hidden_dim: int, *, activation: str = "silu",
                 bias: bool = False, alpha: float | None = None, limit: float | None = None,
                 up_offset: float = 0.0, fuse_grad_accumulation: bool = False):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("dim", dim), ("hidden_dim", hidden_dim)):
            V.positive_int(name, v)
        self.fuse_grad_accumulation = V.flag("fuse_grad_accumulation", fuse_grad_accumulation)
        V.flag("bias", bias)
        if alpha is not None and (activation != "silu" or not isinstance(alpha, (int, float)) or
                                  isinstance(alpha, bool) or not math.isfinite(alpha)):
            raise ValueError(f"alpha: a finite number scaling silu's sigmoid (activation='silu'), got alpha={alpha!r} "
                             f"with activation={activation!r}")
        V.optional(V.positive_number, "limit", limit)
        V.finite_number("up_offset", up_offset)
        self.num_experts, self.dim, self.hidden_dim = num_experts, dim, hidden_dim
        self.activation = activation
        self.act = _activation(activation)
        self.alpha = None if alpha is None else float(alpha)
        self.limit = None if limit is None else float(limit)
        self.up_offset = float(up_offset)
        self.w_in = nn.Parameter(torch.empty(num_experts, dim, 2 * hidden_dim))
        self.w_out = nn.Parameter(torch.empty(num_experts, hidden_dim, dim))
        self.b_in = nn.Parameter(torch.zeros(num_experts, 2 * hidden_dim)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, dim)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.w_in, -1 / math.sqrt(self.dim), 1 / math.sqrt(self.dim))
        nn.init.uniform_(self.w_out, -1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))

    @property
    def plain(self) -> bool:
        """Whether this is the plain GLU the fused ``moekit::glu`` operator computes."""
        return self.alpha is None and self.limit is None and self.up_offset == 0.0

    def extra_repr(self) -> str:
        extra = "" if self.plain else f", alpha={self.alpha}, limit={self.limit}, up_offset={self.up_offset:g}"
        return (f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
                f"activation={self.activation}, bias={self.b_in is not None}" + extra)

    def _glu(self, h: Tensor) -> Tensor:
        if self.plain and h.dim() == 2:
            return glu(h.contiguous(), self.activation)
        gate, up = h.chunk(2, dim=-1)
        if self.limit is not None:
            gate = gate.clamp(max=self.limit)
            up = up.clamp(min=-self.limit, max=self.limit)
        a = gate * torch.sigmoid(self.alpha * gate) if self.alpha is not None else self.act(gate)
        return a * (up + self.up_offset) if self.up_offset != 0.0 else a * up

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        dt = compute_dtype(x_RD, self.w_in)
        fuse = self.fuse_grad_accumulation
        h_R2H = grouped_mm(x_RD.to(dt), local(self.w_in).to(dt), counts_E, fuse_grad_accumulation=fuse)
        if self.b_in is not None:
            h_R2H = h_R2H + _row_bias(local(self.b_in).to(dt), counts_E, x_RD.shape[0])
        y_RD = grouped_mm(self._glu(h_R2H), local(self.w_out).to(dt), counts_E, fuse_grad_accumulation=fuse)
        if self.b_out is not None:
            y_RD = y_RD + _row_bias(local(self.b_out).to(dt), counts_E, x_RD.shape[0])
        return y_RD

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        dt = compute_dtype(x_TD, self.w_in)
        h_ET2H = torch.einsum("td,edh->eth", x_TD.to(dt), self.w_in.to(dt))
        if self.b_in is not None:
            h_ET2H = h_ET2H + self.b_in.to(dt)[:, None]
        y_ETD = torch.einsum("eth,ehd->etd", self._glu(h_ET2H), self.w_out.to(dt))
        if self.b_out is not None:
            y_ETD = y_ETD + self.b_out.to(dt)[:, None]
        return y_ETD


class ModuleExperts(ExpertBank):
    """Any user ``nn.Module`` experts (each maps (rows, D) -> (rows, D)); run one by one (slower path)."""

    def __init__(self, experts: list[nn.Module] | nn.ModuleList, dim: int):
        super().__init__()
        if len(experts) < 1 or not all(isinstance(e, nn.Module) for e in experts):
            raise TypeError("expert: expected a non-empty list of nn.Module experts")
        self.experts = nn.ModuleList(experts)
        self.num_experts, self.dim = len(experts), dim

    def config(self) -> ExpertsConfig:
        """User modules are compared by class name (their own settings are theirs)."""
        return ExpertsConfig("modules", {"classes": [type(m).__qualname__ for m in self.experts]})

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        sizes = counts_E.tolist()                   # host read: per-module experts need concrete sizes
        chunks = torch.split(x_RD, sizes + [x_RD.shape[0] - sum(sizes)], dim=0)
        outs = [expert(c) for expert, c in zip(self.experts, chunks[:-1])]
        pad = chunks[-1].shape[0]
        if pad:                                     # padding rows (not executed): zeros
            outs.append(outs[0].new_zeros(pad, *outs[0].shape[1:]) if outs else chunks[-1] * 0)
        return torch.cat(outs, dim=0)

    def forward_dense(self, x_TD: Tensor) -> Tensor:
        return torch.stack([expert(x_TD) for expert in self.experts], dim=0)


class InputGated:
    """Mixin for an expert bank whose experts take the combine weight on their *input*:
    ``Σ_k E_k(w_k x)`` (Llama-4), the same as output-side gating only for linear experts. The bank's
    parameters and kernels are those of the bank class it is mixed into (:func:`input_gated`)."""

    def forward_weighted(self, x_RD: Tensor, counts_E: Tensor, weight_R: Tensor,
                         valid_R: Tensor | None = None) -> Tensor:
        x_RD = x_RD * weight_R[:, None].to(x_RD.dtype)
        if valid_R is None:
            return self(x_RD, counts_E)
        x_RD = torch.where(valid_R[:, None], x_RD, torch.zeros_like(x_RD))     # no gradient from padding rows
        y_RD = self(x_RD, counts_E)
        return torch.where(valid_R[:, None], y_RD, torch.zeros_like(y_RD))

    def forward_dense_weighted(self, x_TD: Tensor, combine_TE: Tensor) -> Tensor:
        """``y_t = Σ_{e: combine[t,e] ≠ 0} E_e(combine[t, e] · x_t)``: E dense passes (the oracle)."""
        y_TD = None
        for e in range(self.num_experts):
            c_T1 = combine_TE[:, e:e + 1].to(x_TD.dtype)
            y_e = self.forward_dense(x_TD * c_T1)[e]
            y_e = torch.where(c_T1 != 0, y_e, torch.zeros_like(y_e))
            y_TD = y_e if y_TD is None else y_TD + y_e
        return y_TD

    def config(self) -> ExpertsConfig:
        return dataclasses.replace(super().config(), gate_on_input=True)


_INPUT_GATED: dict[type, type] = {}


def input_gated(cls: type[ExpertBank]) -> type[ExpertBank]:
    """The input-gated variant of an expert bank class (same constructor and parameter names)."""
    if not (isinstance(cls, type) and issubclass(cls, ExpertBank)):
        raise TypeError(f"cls: expected an ExpertBank class, got {cls!r}")
    if issubclass(cls, InputGated):
        return cls
    if cls not in _INPUT_GATED:
        _INPUT_GATED[cls] = type(f"InputGated{cls.__name__}", (InputGated, cls),
                                 {"__doc__": f"{cls.__name__} taking the combine weight on the input (InputGated)."})
    return _INPUT_GATED[cls]


EXPERTS: dict[str, type[ExpertBank]] = {"mlp": MLPExperts, "glu": GLUExperts}


def build_experts(expert: str | list[nn.Module] | nn.ModuleList | Callable[[], nn.Module], num_experts: int,
                  dim: int, hidden_dim: int, *, gate_on_input: bool = False, **options) -> ExpertBank:
    """``"mlp"``/``"glu"`` build a stacked bank; a list of modules or a zero-argument factory builds
    :class:`ModuleExperts`; ``gate_on_input`` builds the :func:`input_gated` variant."""
    wrap = input_gated if V.flag("gate_on_input", gate_on_input) else (lambda cls: cls)
    if isinstance(expert, str):
        if expert not in EXPERTS:
            raise ValueError(f"expert: unknown expert {expert!r}; choose one of {sorted(EXPERTS)}, a list of "
                             "nn.Module, or a factory returning an nn.Module")
        return wrap(EXPERTS[expert])(num_experts, dim, hidden_dim, **options)
    if isinstance(expert, (list, nn.ModuleList)):
        if len(expert) != num_experts:
            raise ValueError(f"expert: got {len(expert)} modules for num_experts={num_experts}")
        return wrap(ModuleExperts)(expert, dim)
    if callable(expert) and not isinstance(expert, nn.Module):
        return wrap(ModuleExperts)([expert() for _ in range(num_experts)], dim)
    raise TypeError(f"expert: expected 'mlp', 'glu', a list of nn.Module or a factory, got {type(expert).__name__}")
