"""Conditionally parameterised convolutions: CondConv (Yang et al. 2019) and Dynamic Convolution (Chen et al. 2020).

A CondConv layer holds E expert kernels ``W_1..W_E`` (and biases ``b_1..b_E``) and computes, per example,

    y = (α_1 W_1 + … + α_E W_E) * x + (α_1 b_1 + … + α_E b_E),     α = r(x) = sigmoid(fc(GAP(x)))  (CondConv)
                                                                    α = softmax(r(x) / τ)           (DynamicConv)

Convolution is linear in the kernel, so this is *exactly* the dense mixture of E conv experts
``Σ_i α_i (W_i * x + b_i)`` (Yang et al. 2019, CondConv). Two ways to compute it (``mode``):

* ``"mix_kernels"`` – form each example's kernel ``Σ_i α_i W_i`` (a (B,E)×(E,|W|) matmul), then run ONE
  grouped conv over the whole batch with ``B·groups`` groups (the batch folded into the channels).
  Per example: E·|W| MADDs of mixing + one conv.
* ``"mix_outputs"`` – run the E expert convs as ONE dense conv with E·O output channels over the
  batch, then mix the E outputs with α. Per example: E convs + E·O·U'X' MADDs of mixing.

``mode="auto"`` picks per call with :func:`choose_mode`, a documented cost comparison (below).
Both modes are checked against :func:`condconv_reference` (the explicit loop Σ_i α_i conv(x, W_i, b_i)).

**Auto rule** (:func:`choose_mode`). ``mix_kernels`` executes far fewer MADDs for every E ≥ 2, but its
per-example grouped conv runs at a lower throughput than one dense conv (the batch becomes B·groups small
convolutions), while ``mix_outputs`` is one large dense conv. The rule compares estimated *times* in
units of dense-conv MADDs::

    cost_mix_kernels = E·|W|  +  |W|·U'·X' / η        (η = GROUPED_CONV_EFFICIENCY)
    cost_mix_outputs = E·|W|·U'·X'  +  E·O·U'·X'

(|W| = O·(I/groups)·kh·kw, the MADDs of one kernel at one output pixel) and mixes outputs when that is
cheaper — essentially while E < 1/η: few experts → mix outputs, many experts → mix kernels, as the
paper's released code does (seed 002). With batch size 1 the grouped conv is an ordinary conv and
``mix_kernels`` is always chosen. η = 0.6 was measured with ``benchmarks/condconv.py`` on CPU
(float32, forward+backward; median 0.64 over digits-CNN and 64-channel 16×16 layers), so on CPU the switch
is at E = 2: E = 1 mixes outputs (B > 1), E ≥ 2 mixes kernels; the rule picked the measured-faster mode in
32 of 36 benchmark cases. It misjudges tiny maps with many groups (4×4 maps, B = 64: η ≈ 0.1, mix_outputs
faster up to E = 4). Accelerators whose grouped convolutions are slow have a smaller η and switch later;
pass ``mode=`` explicitly to override.

**Output and routing design.** ``forward(x, routing_weights=None) -> Tensor`` returns a plain tensor
(drop-in feel of ``nn.Conv2d``); CondConv has no auxiliary loss, and the layer keeps no state from a
forward pass (no ``last_routing`` attribute). Routing is obtained with ``route(x) -> (B, E)`` (the
layer's own router) or computed once per block by a :class:`CondConvRouter` and passed to several
layers with ``forward(x, routing_weights=alpha_BE)`` — how EfficientNet-CondConv shares routing
across a block's CondConv layers [code]. Layers built with ``own_router=False`` have no router and
require ``routing_weights``. :func:`routing_metrics` turns routing weights into detached logging metrics.

**MADDs** (:meth:`CondConv2d.madds`, :meth:`CondConvRouter.madds`): per-example multiply-accumulates
actually executed: conv ``O·(I/groups)·kh·kw·U'X'``, linear ``in·out``, kernel mixing ``E·|W|`` (+ ``E·O``
for biases), output mixing ``E·O·U'X'``, global average pooling ``I·U·X`` (one add each). Bias additions,
activations, sigmoid/softmax and batch-norm are not counted.

Legend (the package's, ``moekit/__init__.py``): B batch, I input channels (a kernel's input-channel axis
holds I/groups of them), O output channels, U/X image height/width (the input's; U'/X' in the text are
the output's), E experts, H router hidden units. ``groups`` is the conv's channel groups and kh/kw its
kernel height/width (sizes, not shape letters).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .. import _validation as V
from .._validation import positive_int as _positive_int

MODES = ("auto", "mix_kernels", "mix_outputs")
ROUTINGS = ("sigmoid", "softmax")

# Throughput of the per-example grouped conv (mix_kernels) relative to one dense conv with the same
# MADDs, forward + backward, measured by benchmarks/condconv.py on CPU (float32; 0.3–0.85, typical 0.6).
# The auto rule mixes outputs while E < ~1/η.
GROUPED_CONV_EFFICIENCY = 0.6


# --------------------------------------------------------------------------------------------- helpers
def _pair(name: str, value: object, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints, each >= ``minimum``, as a pair."""
    vals = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(vals, (tuple, list)) or len(vals) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum for v in vals)):
        raise ValueError(f"{name}: expected an int >= {minimum} or a pair of them, got {value!r}")
    return int(vals[0]), int(vals[1])


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def choose_mode(num_experts: int, batch_size: int, kernel_madds: int, out_channels: int, out_pixels: int,
                grouped_efficiency: float = GROUPED_CONV_EFFICIENCY) -> str:
    """The ``mode="auto"`` rule: ``"mix_outputs"`` if its estimated cost is lower, else ``"mix_kernels"``.

    ``kernel_madds`` = |W| = O·(I/groups)·kh·kw (MADDs of applying one kernel at one output pixel),
    ``out_pixels`` = U'·X' (the output's height times width). Estimated per-example costs, in dense-conv
    MADD units::

        mix_kernels: E·|W| + |W|·U'X' / η      (η = grouped_efficiency)
        mix_outputs: E·|W|·U'X' + E·O·U'X'

    ``batch_size == 1`` always gives ``"mix_kernels"`` (the grouped conv is then an ordinary conv and
    never costs more MADDs). Ties go to ``mix_kernels`` (fewer MADDs, no (B, E·O, U', X') intermediate).
    """
    for name, v in (("num_experts", num_experts), ("batch_size", batch_size), ("kernel_madds", kernel_madds),
                    ("out_channels", out_channels), ("out_pixels", out_pixels)):
        _positive_int(name, v)
    if not 0.0 < grouped_efficiency <= 1.0:
        raise ValueError(f"grouped_efficiency: expected a value in (0, 1], got {grouped_efficiency}")
    if batch_size == 1:
        return "mix_kernels"
    E, w_size, pixels = num_experts, kernel_madds, out_pixels
    cost_kernels = E * w_size + w_size * pixels / grouped_efficiency
    cost_outputs = E * w_size * pixels + E * out_channels * pixels
    return "mix_outputs" if cost_outputs < cost_kernels else "mix_kernels"


def routing_metrics(routing_weights_BE: Tensor) -> dict[str, Tensor]:
    """Detached logging metrics of routing weights (B, E).

    ``routing_mean_E`` mean weight per expert; ``routing_std_E`` its spread over the batch;
    ``routing_entropy`` mean over examples of the entropy of α normalised to sum 1 (log E = uniform).
    """
    a = routing_weights_BE.detach().float()
    p = a / a.sum(-1, keepdim=True).clamp_min(1e-12)
    return {
        "routing_mean_E": a.mean(0),
        "routing_std_E": a.std(0, unbiased=False),
        "routing_entropy": -(p * p.clamp_min(1e-20).log()).sum(-1).mean(),
    }


def condconv_reference(x_BIUX: Tensor, weight_EOIkk: Tensor, bias_EO: Tensor | None, alpha_BE: Tensor,
                       stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                       dilation: int | tuple[int, int] = 1, groups: int = 1) -> Tensor:
    """The slow, obviously-right definition: ``Σ_i α_i · (conv(x, W_i) + b_i)``, one conv per expert."""
    y = None
    for i in range(weight_EOIkk.shape[0]):
        b = None if bias_EO is None else bias_EO[i]
        yi_BOUX = F.conv2d(x_BIUX, weight_EOIkk[i], b, stride, padding, dilation, groups)
        term = alpha_BE[:, i, None, None, None].to(yi_BOUX.dtype) * yi_BOUX
        y = term if y is None else y + term
    assert y is not None
    return y


def mix_kernels_conv2d(x_BIUX: Tensor, alpha_BE: Tensor, weight_EOIkk: Tensor, bias_EO: Tensor | None,
                       stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                       dilation: tuple[int, int] = (1, 1), groups: int = 1) -> Tensor:
    """``mode="mix_kernels"``: Σ_i α_i W_i per example (one matmul), then ONE conv with the batch folded
    into the groups (B·groups groups). Same result as :func:`condconv_reference`."""
    B, I, U, X = x_BIUX.shape
    E, O, in_per_group, kh, kw = weight_EOIkk.shape
    w_BOIkk = (alpha_BE @ weight_EOIkk.reshape(E, -1)).reshape(B * O, in_per_group, kh, kw)
    b = None if bias_EO is None else (alpha_BE @ bias_EO).reshape(B * O)
    # channels (B, I) flattened: group b·groups+g holds example b's input group g and output group g
    y = F.conv2d(x_BIUX.reshape(1, B * I, U, X), w_BOIkk, b, stride, padding, dilation, B * groups)
    return y.reshape(B, O, y.shape[-2], y.shape[-1])


def mix_outputs_conv2d(x_BIUX: Tensor, alpha_BE: Tensor, weight_EOIkk: Tensor, bias_EO: Tensor | None,
                       stride: tuple[int, int] = (1, 1), padding: tuple[int, int] = (0, 0),
                       dilation: tuple[int, int] = (1, 1), groups: int = 1) -> Tensor:
    """``mode="mix_outputs"``: all E expert convs as ONE dense conv with E·O outputs, then
    Σ_i α_i y_i (+ Σ_i α_i b_i). Same result as :func:`condconv_reference`."""
    B = x_BIUX.shape[0]
    E, O, in_per_group, kh, kw = weight_EOIkk.shape
    # out channels must be group-major for F.conv2d: (groups, E, O/groups) — expert i's group-g filters together
    w = weight_EOIkk.reshape(E, groups, O // groups, in_per_group, kh, kw).transpose(0, 1).reshape(
        groups * E * (O // groups), in_per_group, kh, kw)
    y = F.conv2d(x_BIUX, w, None, stride, padding, dilation, groups)
    U, X = y.shape[-2], y.shape[-1]                              # the output's height and width
    y_BEOUX = y.reshape(B, groups, E, O // groups, U, X).transpose(1, 2).reshape(B, E, O, U, X)
    y_BOUX = torch.einsum("be,beoux->boux", alpha_BE, y_BEOUX)
    if bias_EO is not None:
        y_BOUX = y_BOUX + (alpha_BE @ bias_EO)[:, :, None, None]
    return y_BOUX


def anneal_temperature(step: int, total: int, start: float = 30.0, end: float = 1.0) -> float:
    """Dynamic Conv's schedule: τ linear from ``start`` at step 0 to ``end`` at ``total``, then ``end``.

    Chen et al. 2020 (Dynamic Convolution; recalled) anneal τ from 30 to 1 over the first epochs; pass the number of
    annealing steps as ``total`` and call once per step (or epoch) with ``set_temperature``.
    """
    V.non_negative_int("total", total)
    if step < 0:
        raise ValueError(f"step: must be >= 0, got {step}")
    if not (start > 0 and end > 0):
        raise ValueError(f"start/end: temperatures must be > 0, got start={start}, end={end}")
    if total == 0 or step >= total:
        return float(end)
    return float(start + (end - start) * step / total)


# --------------------------------------------------------------------------------------------- router
def _check_router_options(routing: object, temperature: object, reduction: object,
                          reduction_name: str = "reduction") -> None:
    if routing not in ROUTINGS:
        raise ValueError(f"routing: expected one of {ROUTINGS}, got {routing!r}")
    V.positive_number("temperature", temperature)
    if routing == "sigmoid" and temperature != 1.0:
        raise ValueError(f"temperature: only softmax routing has a temperature (routing='sigmoid'), got {temperature}")
    if reduction is not None:
        _positive_int(reduction_name, reduction)


class CondConvRouter(nn.Module):
    """``α = sigmoid(r(x))`` (CondConv) or ``α = softmax(r(x) / τ)`` (DynamicConv): (B, E), ``r`` a
    linear map (with bias) of ``GAP(x)``.

    ``reduction=None`` (CondConv) makes ``r`` one linear layer I→E; an int r makes it the
    squeeze-excitation MLP of Dynamic Conv, I→H→E with ReLU, H = max(4, I // r) hidden units.
    ``temperature`` (softmax only) is a buffer changed with :meth:`set_temperature`.
    Build one per block and pass its output to every CondConv layer of the block.
    """

    def __init__(self, in_channels: int, num_experts: int, *, routing: str = "sigmoid",
                 temperature: float = 1.0, reduction: int | None = None):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("num_experts", num_experts)
        _check_router_options(routing, temperature, reduction)
        self.in_channels, self.num_experts, self.routing = in_channels, num_experts, routing
        self.reduction = reduction
        if reduction is None:
            self.hidden = None
            self.fc = nn.Linear(in_channels, num_experts)
            self.fc_in = None
        else:
            self.hidden = max(4, in_channels // reduction)
            self.fc_in = nn.Linear(in_channels, self.hidden)
            self.fc = nn.Linear(self.hidden, num_experts)
        self.register_buffer("temperature", torch.tensor(1.0))
        self.set_temperature(temperature)

    def extra_repr(self) -> str:
        t = f", temperature={float(self.temperature):g}" if self.routing == "softmax" else ""
        return f"in_channels={self.in_channels}, num_experts={self.num_experts}, routing={self.routing!r}{t}"

    def set_temperature(self, temperature: float) -> None:
        """Set τ (softmax routing). Raises for sigmoid routing unless τ == 1."""
        _check_router_options(self.routing, temperature, self.reduction)
        self.temperature.fill_(float(temperature))

    def logits(self, x_BIUX: Tensor) -> Tensor:
        """``r(x)`` before the sigmoid/softmax: (B, E)."""
        _check_input(x_BIUX, self.in_channels)
        h = x_BIUX.mean(dim=(2, 3))                                  # (B, I)
        if self.fc_in is not None:
            h = F.relu(self.fc_in(h))                                # (B, H)
        return self.fc(h)

    def forward(self, x_BIUX: Tensor) -> Tensor:
        z_BE = self.logits(x_BIUX)
        if self.routing == "sigmoid":
            return torch.sigmoid(z_BE)
        return torch.softmax(z_BE / self.temperature.to(z_BE.dtype), dim=-1)

    def madds(self, input_size: int | Sequence[int]) -> int:
        """Per-example MADDs: GAP (I·U·X adds) + the linear layer(s)."""
        U, X = _pair("input_size", input_size, 1)
        n = self.in_channels * U * X
        if self.hidden is None:
            return n + self.in_channels * self.num_experts
        return n + self.in_channels * self.hidden + self.hidden * self.num_experts


def _check_input(x: object, in_channels: int) -> Tensor:
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x: expected a floating-point torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4 or x.shape[1] != in_channels:
        raise ValueError(f"x: expected shape (B, {in_channels}, U, X), got {tuple(x.shape)}")
    return x


# --------------------------------------------------------------------------------------------- layers
class CondConv2d(nn.Module):
    """Per-example mixture of E conv kernels: ``y = (Σ_i α_i W_i) * x + Σ_i α_i b_i`` (Yang et al. 2019, eq. 1).

    ``α = sigmoid(r(x))`` from the layer's own :class:`CondConvRouter` (``own_router=True``) or passed
    in as ``routing_weights`` (B, E) — e.g. one router per block shared by its layers.
    Arguments as ``nn.Conv2d`` (``padding`` ints only, zero padding) plus ``num_experts`` and
    ``mode`` (``"auto"``, ``"mix_kernels"``, ``"mix_outputs"``; see the module docstring for the rule).
    Each expert kernel is initialised independently like ``nn.Conv2d`` (Kaiming-uniform, a=√5).
    ``weight``: (E, O, I/groups, kh, kw); ``bias``: (E, O) or None.
    With E = 1 and α = 1 it is exactly ``nn.Conv2d``.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], num_experts: int,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *,
                 mode: str = "auto", routing: str = "sigmoid", temperature: float = 1.0,
                 own_router: bool = True, router_reduction: int | None = None):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        _positive_int("num_experts", num_experts)
        _positive_int("groups", groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"groups: must divide in_channels={in_channels} and out_channels={out_channels}, "
                             f"got {groups}")
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        if not isinstance(own_router, bool):
            raise TypeError(f"own_router: expected a bool, got {type(own_router).__name__}")
        self.in_channels, self.out_channels, self.num_experts, self.groups = (in_channels, out_channels,
                                                                               num_experts, groups)
        self.kernel_size = _pair("kernel_size", kernel_size, 1)
        self.stride = _pair("stride", stride, 1)
        self.padding = _pair("padding", padding, 0)
        self.dilation = _pair("dilation", dilation, 1)
        self.mode = mode
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(num_experts, out_channels, in_channels // groups, kh, kw))
        self.bias = nn.Parameter(torch.empty(num_experts, out_channels)) if bias else None
        _check_router_options(routing, temperature, router_reduction, "router_reduction")  # even without a router
        self.router = (CondConvRouter(in_channels, num_experts, routing=routing, temperature=temperature,
                                      reduction=router_reduction) if own_router else None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        fan_in = (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]
        bound = 1.0 / math.sqrt(fan_in)
        for i in range(self.num_experts):   # independent init per expert, like nn.Conv2d
            nn.init.kaiming_uniform_(self.weight[i], a=math.sqrt(5))
            if self.bias is not None:
                nn.init.uniform_(self.bias[i], -bound, bound)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"num_experts={self.num_experts}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, groups={self.groups}, bias={self.bias is not None}, mode={self.mode!r}")

    # ---------------------------------------------------------------- routing
    def route(self, x_BIUX: Tensor) -> Tensor:
        """Routing weights α (B, E) from this layer's own router."""
        if self.router is None:
            raise ValueError("routing_weights: this layer was built with own_router=False; pass routing_weights "
                             "(B, num_experts) computed by a shared CondConvRouter")
        return self.router(x_BIUX)

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature τ of this layer's own router."""
        if self.router is None:
            raise ValueError("temperature: this layer has no own router (own_router=False); set it on the shared "
                             "CondConvRouter")
        self.router.set_temperature(temperature)

    # ---------------------------------------------------------------- shapes and costs
    def output_size(self, input_size: int | Sequence[int]) -> tuple[int, int]:
        U, X = _pair("input_size", input_size, 1)
        return (conv_output_size(U, self.kernel_size[0], self.stride[0], self.padding[0], self.dilation[0]),
                conv_output_size(X, self.kernel_size[1], self.stride[1], self.padding[1], self.dilation[1]))

    def kernel_madds(self) -> int:
        """|W| = O·(I/groups)·kh·kw: MADDs of applying one kernel at one output pixel (= its size)."""
        return self.out_channels * (self.in_channels // self.groups) * self.kernel_size[0] * self.kernel_size[1]

    def resolve_mode(self, batch_size: int, input_size: int | Sequence[int]) -> str:
        """The compute mode a call with this batch and input size uses (``mode``, or the auto rule)."""
        if self.mode != "auto":
            return self.mode
        out_h, out_w = self.output_size(input_size)
        return choose_mode(self.num_experts, batch_size, self.kernel_madds(), self.out_channels, out_h * out_w)

    def madds_breakdown(self, input_size: int | Sequence[int], mode: str = "mix_kernels") -> dict[str, int]:
        """Per-example MADDs by part: ``router`` (0 without an own router), ``mixing``, ``conv``, ``total``.

        ``mode="mix_kernels"`` is the paper's count (kernel sum + one conv); ``"mix_outputs"`` counts E convs
        plus output mixing.
        """
        if mode not in ("mix_kernels", "mix_outputs"):
            raise ValueError(f"mode: expected 'mix_kernels' or 'mix_outputs', got {mode!r}")
        out_h, out_w = self.output_size(input_size)
        w_size, E, O, pixels = self.kernel_madds(), self.num_experts, self.out_channels, out_h * out_w
        router = 0 if self.router is None else self.router.madds(input_size)
        bias_mix = E * O if self.bias is not None else 0
        if mode == "mix_kernels":
            mixing, conv = E * w_size + bias_mix, w_size * pixels
        else:
            mixing, conv = E * O * pixels + bias_mix, E * w_size * pixels
        return {"router": router, "mixing": mixing, "conv": conv, "total": router + mixing + conv}

    def madds(self, input_size: int | Sequence[int], mode: str = "mix_kernels") -> int:
        """Per-example executed multiply-adds incl. routing and kernel mixing (see :meth:`madds_breakdown`)."""
        return self.madds_breakdown(input_size, mode)["total"]

    # ---------------------------------------------------------------- forward
    def forward(self, x_BIUX: Tensor, routing_weights: Tensor | None = None) -> Tensor:
        """``(B, I, U, X) -> (B, O, U', X')``; ``routing_weights`` (B, E) overrides the own router."""
        _check_input(x_BIUX, self.in_channels)
        B = x_BIUX.shape[0]
        if routing_weights is None:
            alpha_BE = self.route(x_BIUX)
        else:
            if not isinstance(routing_weights, Tensor):
                raise TypeError(f"routing_weights: expected a torch.Tensor, got {type(routing_weights).__name__}")
            if tuple(routing_weights.shape) != (B, self.num_experts):
                raise ValueError(f"routing_weights: expected shape ({B}, {self.num_experts}), "
                                 f"got {tuple(routing_weights.shape)}")
            alpha_BE = routing_weights
        alpha_BE = alpha_BE.to(self.weight.dtype)
        # an empty batch cannot be folded into B·groups = 0 groups: the dense path handles it
        mode = "mix_outputs" if B == 0 else self.resolve_mode(B, tuple(x_BIUX.shape[2:]))
        fn = mix_kernels_conv2d if mode == "mix_kernels" else mix_outputs_conv2d
        return fn(x_BIUX, alpha_BE, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class DynamicConv2d(CondConv2d):
    """Dynamic Convolution (Chen et al. 2020): CondConv with ``α = softmax(r(x) / τ)`` (Σ_i α_i = 1).

    ``r`` is the squeeze-excitation MLP GAP → I→H→E (``router_reduction=4``: H = max(4, I // 4) hidden units).
    ``temperature`` starts at 30 (the paper's initial τ); anneal it toward 1 early in training with
    ``layer.set_temperature(anneal_temperature(step, total))``. All other arguments as :class:`CondConv2d`.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], num_experts: int,
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, bias: bool = True, *,
                 mode: str = "auto", temperature: float = 30.0, own_router: bool = True,
                 router_reduction: int | None = 4):
        super().__init__(in_channels, out_channels, kernel_size, num_experts, stride, padding, dilation, groups,
                         bias, mode=mode, routing="softmax", temperature=temperature, own_router=own_router,
                         router_reduction=router_reduction)
