"""DeepMoE (Wang et al., "Deep Mixture of Experts via Shallow Embedding", UAI 2019): channel-gated convolutions.

A shallow embedding network maps the input image to a latent vector ``e``; a multi-headed sparse gate
turns ``e`` into one non-negative gate vector per gated convolution, ``g^l = ReLU(W_g^l e)``; the gated
convolution is a mixture of experts over input channels, ``y^l = w^l * (g^l ⊙ x^l)`` (kernel ``w^l``).
A zero gate means that channel's share of the convolution need not be computed; at inference :class:`GatedConv2d` really
skips every input channel whose gate is zero for the whole batch and reports executed vs dense MACs.

Training objective (the paper's): ``loss = CE(base logits, y) + λ Σ_l ||g^l||₁ + μ CE(embedding logits, y)``,
with the L1 norm averaged over the batch. Then the base network is fine-tuned with the gating frozen and
``λ = μ = 0``.

Where each term lives (and why):
  * the λ term depends only on quantities inside the forward pass (the gates), like the balancing loss
    of :class:`moekit.layers.MoE`, so each :class:`GatedConv2d` returns it, weighted, as its ``aux_loss``;
  * the μ term needs the labels. Rather than passing labels through ``forward`` (which would make the
    inference call differ from the training call and mix supervision into the routed layers), the
    forward pass returns the embedding classifier's logits and :func:`embedding_loss` turns them into a
    weighted ``MoEOutput``-style loss in the training step:
    ``loss = CE(out.y, y) + out.aux_loss + embedding_loss(out.embedding_logits, y, μ).aux_loss``.
  * :func:`deepmoe_aux_loss` computes both terms at once from the gates (the reference the split
    version is tested against).

FLOPs are counted as multiply-accumulates (MACs) per example: a k×k convolution from I input to O output
channels with a U'×X' output costs ``O·U'·X'·I·k²``; skipping c input channels saves ``O·U'·X'·c·k²``.
Biases and element-wise ops are not counted.

Legend (the package's, ``moekit/__init__.py``): B batch, I input channels, O output channels, U/X image
height/width (U'/X' in the text: a convolution's output), D embedding features (the gate heads' and the
embedding classifier's input features), Y classes. A network has one gate tensor per gated layer (l).
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..types import MoEOutput, zero_loss
from .. import _validation as V
from .._validation import positive_int as _positive_int


_non_negative = V.non_negative_number


def conv_output_size(size: int, kernel_size: int, stride: int, padding: int) -> int:
    """Spatial output size of a convolution (dilation 1)."""
    return (size + 2 * padding - kernel_size) // stride + 1


def conv_macs(in_channels: int, out_channels: int, kernel_size: int, out_h: int, out_w: int) -> int:
    """MACs of one example through a k×k convolution: ``O · U' · X' · I · k²`` (U'×X' its output)."""
    return out_channels * out_h * out_w * in_channels * kernel_size * kernel_size


def gate_l1(gates_BI: Tensor) -> Tensor:
    """``mean_b ||g_b||₁`` — one layer's (unweighted) sparsity term."""
    return gates_BI.abs().sum(-1).mean()


class DeepMoEOutput(NamedTuple):
    """What a DeepMoE network's forward returns: the :class:`MoEOutput` fields plus the embedding head.

    ``y``: base-network logits; ``aux_loss``: weighted ``λ Σ_l mean_b ||g^l_b||₁`` (zero when λ = 0);
    ``metrics``: detached per-layer and whole-network statistics (unweighted ``gate_l1``, zero-gate
    fraction, executed / ideal / dense MACs per example); ``embedding_logits``: the linear classifier on
    ``e`` (for the μ term, see :func:`embedding_loss`; ``None`` for an ungated network); ``gates``: one
    gate tensor ``(B, I)`` per gated layer, I its input channels (not detached, for analysis or custom
    losses; empty when ungated).
    """
    y: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]
    embedding_logits: Tensor | None
    gates: list[Tensor]


class ShallowEmbedding(nn.Module):
    """The shallow embedding network: stride-2 3×3 convolutions with ReLU, global average pooling.

    ``e = GAP(ReLU(conv_n(… ReLU(conv_1(x)))))`` with every ``conv_i`` 3×3, stride 2, padding 1
    (``channels`` gives the widths of all but the last, which has ``embed_dim`` outputs), and the
    embedding classifier ``logits = e W_c + b_c`` used by the μ·CE term. The paper uses 4 (CIFAR) or 5
    (ImageNet) such layers at ≈2 % of the base network's compute; an 8×8 digit needs 3 to reach 1×1.

    ``forward(x_BIUX) -> (e_BD, logits_BY)``.
    """

    def __init__(self, in_channels: int = 1, embed_dim: int = 32, num_classes: int = 10, *,
                 channels: Sequence[int] = (8, 16)):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("embed_dim", embed_dim)
        _positive_int("num_classes", num_classes)
        chans = list(channels)
        for i, c in enumerate(chans):
            _positive_int(f"channels[{i}]", c)
        widths = [in_channels, *chans, embed_dim]
        self.in_channels, self.embed_dim, self.num_classes = in_channels, embed_dim, num_classes
        self.convs = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, x_BIUX: Tensor) -> tuple[Tensor, Tensor]:
        if x_BIUX.dim() != 4 or x_BIUX.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, in_channels={self.in_channels}, U, X), got {tuple(x_BIUX.shape)}")
        h = x_BIUX
        for conv in self.convs:
            h = F.relu(conv(h))
        e_BD = h.mean(dim=(2, 3))
        return e_BD, self.classifier(e_BD)

    def macs(self, height: int, width: int) -> int:
        """MACs per example for an ``height × width`` input (convolutions and the classifier)."""
        total = 0
        for conv in self.convs:
            height, width = conv_output_size(height, 3, 2, 1), conv_output_size(width, 3, 2, 1)
            total += conv_macs(conv.in_channels, conv.out_channels, 3, height, width)
        return total + self.embed_dim * self.num_classes


class MultiHeadGate(nn.Module):
    """Multi-headed sparse gating: one head per gated layer, ``g^l = ReLU(W_g^l e + b^l)``.

    ReLU makes gates exactly zero where the pre-activation is ≤ 0 (sparse, non-probabilistic: the number
    of active channels varies per input and layer). The paper's heads have no bias; ``bias=True`` (default)
    adds one initialised to ``bias_init`` so that training starts with the gates open (≈ the plain
    network); ``bias=False`` gives the paper's exact form.

    ``forward(e_BD) -> list of tensors g_BI``, one per gated layer l (I = ``channels[l]``, that layer's
    input channels).
    """

    def __init__(self, embed_dim: int, channels: Sequence[int], *, bias: bool = True, bias_init: float = 1.0):
        super().__init__()
        _positive_int("embed_dim", embed_dim)
        chans = list(channels)
        if not chans:
            raise ValueError("channels: expected at least one gated layer width, got an empty sequence")
        for i, c in enumerate(chans):
            _positive_int(f"channels[{i}]", c)
        if not isinstance(bias, bool):
            raise TypeError(f"bias: expected a bool, got {type(bias).__name__}")
        self.embed_dim, self.channels = embed_dim, chans
        self.heads = nn.ModuleList(nn.Linear(embed_dim, c, bias=bias) for c in chans)
        if bias:
            for head in self.heads:
                nn.init.constant_(head.bias, float(bias_init))

    def forward(self, e_BD: Tensor) -> list[Tensor]:
        if e_BD.dim() != 2 or e_BD.shape[1] != self.embed_dim:
            raise ValueError(f"e: expected shape (B, embed_dim={self.embed_dim}), got {tuple(e_BD.shape)}")
        return [F.relu(head(e_BD)) for head in self.heads]

    def macs(self) -> int:
        """MACs per example of all heads."""
        return self.embed_dim * sum(self.channels)


class GatedConv2d(nn.Module):
    """Gated convolution, a mixture of experts over input channels: ``y = w * (g ⊙ x) + b`` (kernel ``w``).

    ``forward(x_BIUX, gates_BI) -> MoEOutput(y, aux_loss = l1_weight · mean_b ||g_b||₁, metrics)``.
    ``gates=None`` runs the plain (ungated) convolution, so the same layer builds the baseline CNN.

    In training mode (or with ``skip_zero_channels=False``) the dense product is computed. In eval mode
    the input channels whose gate is zero for *every* example of the batch are sliced out of ``x`` and out
    of the kernel before the convolution, so their compute is really skipped (the result is the same: a
    zero gate zeroes that channel's contribution). With batch size 1 this is per-example skipping.
    Gradients of the skip path equal the dense path's for ``x``, the kernel and the bias; a skipped gate
    itself gets no gradient (the dense path would give it ``Σ x·(w^T * dy)``), which changes nothing for
    ReLU gates, whose pre-activation has zero gradient wherever the gate is zero.

    Metrics (detached, per example): ``gate_l1`` (unweighted), ``zero_gates`` (fraction of gate entries
    exactly zero), ``active_channels`` (input channels computed for this batch), ``macs_executed``
    (what this call computed), ``macs_ideal`` (mean over examples of what per-example skipping computes),
    ``macs_dense`` (all channels); the MAC counts are float64.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int = 3, *, stride: int = 1,
                 padding: int | None = None, bias: bool = True, l1_weight: float = 0.0,
                 skip_zero_channels: bool = True):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        _positive_int("kernel_size", kernel_size)
        _positive_int("stride", stride)
        if padding is None:
            padding = kernel_size // 2
        if not isinstance(padding, int) or isinstance(padding, bool) or padding < 0:
            raise ValueError(f"padding: must be a non-negative int or None, got {padding!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.padding = kernel_size, stride, padding
        self.l1_weight = _non_negative("l1_weight", l1_weight)
        self.skip_zero_channels = bool(skip_zero_channels)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel_size, kernel_size))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_normal_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, bias={self.bias is not None}, l1_weight={self.l1_weight}")

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return (conv_output_size(height, self.kernel_size, self.stride, self.padding),
                conv_output_size(width, self.kernel_size, self.stride, self.padding))

    def forward(self, x_BIUX: Tensor, gates_BI: Tensor | None = None) -> MoEOutput:
        if not isinstance(x_BIUX, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_BIUX).__name__}")
        if x_BIUX.dim() != 4 or x_BIUX.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, in_channels={self.in_channels}, U, X), got {tuple(x_BIUX.shape)}")
        B, _, U, X = x_BIUX.shape
        out_h, out_w = self.output_size(U, X)
        per_channel = conv_macs(1, self.out_channels, self.kernel_size, out_h, out_w)  # MACs of one input channel
        dense = per_channel * self.in_channels
        if gates_BI is None:
            y = F.conv2d(x_BIUX, self.weight, self.bias, self.stride, self.padding)
            d = torch.tensor(float(dense), dtype=torch.float64)
            return MoEOutput(y, zero_loss(x_BIUX), {"macs_executed": d, "macs_ideal": d, "macs_dense": d})
        if not isinstance(gates_BI, Tensor):
            raise TypeError(f"gates: expected a torch.Tensor or None, got {type(gates_BI).__name__}")
        if gates_BI.shape != (B, self.in_channels):
            raise ValueError(f"gates: expected shape (B={B}, in_channels={self.in_channels}), "
                             f"got {tuple(gates_BI.shape)}")

        nonzero_BI = gates_BI != 0
        active_I = nonzero_BI.any(0)
        n_active = int(active_I.sum())
        if self.training or not self.skip_zero_channels or n_active == self.in_channels:
            y = F.conv2d(x_BIUX * gates_BI[:, :, None, None], self.weight, self.bias, self.stride, self.padding)
            executed = dense
        elif n_active == 0:   # every channel skipped: only the bias remains
            y = x_BIUX.new_zeros(B, self.out_channels, out_h, out_w)
            if self.bias is not None:
                y = y + self.bias[None, :, None, None]
            executed = 0
        else:
            idx = active_I.nonzero().squeeze(1)
            xg = x_BIUX.index_select(1, idx) * gates_BI.index_select(1, idx)[:, :, None, None]
            y = F.conv2d(xg, self.weight.index_select(1, idx), self.bias, self.stride, self.padding)
            executed = per_channel * n_active

        l1 = gate_l1(gates_BI)
        aux = self.l1_weight * l1 if self.l1_weight > 0 else zero_loss(x_BIUX)
        metrics = {
            "gate_l1": l1.detach(),
            "zero_gates": (~nonzero_BI).float().mean().detach(),
            "active_channels": torch.tensor(float(n_active)),
            "macs_executed": torch.tensor(float(executed), dtype=torch.float64),
            "macs_ideal": (nonzero_BI.sum(1).double().mean() * per_channel).detach().cpu(),
            "macs_dense": torch.tensor(float(dense), dtype=torch.float64),
        }
        return MoEOutput(y, aux, metrics)


def embedding_loss(embedding_logits_BY: Tensor, labels_B: Tensor, weight: float) -> MoEOutput:
    """The μ term: ``MoEOutput(y = embedding logits, aux_loss = μ · CE(embedding logits, labels), metrics)``.

    Kept out of the network's forward because it needs labels (see the module docstring). Metrics:
    unweighted ``embedding_ce`` and ``embedding_acc`` (accuracy of the embedding classifier, in [0, 1]).
    """
    weight = _non_negative("weight", weight)
    if not isinstance(embedding_logits_BY, Tensor) or embedding_logits_BY.dim() != 2:
        raise ValueError("embedding_logits: expected a (B, Y) tensor, got "
                         f"{getattr(embedding_logits_BY, 'shape', type(embedding_logits_BY).__name__)}")
    if not isinstance(labels_B, Tensor) or labels_B.shape != embedding_logits_BY.shape[:1]:
        raise ValueError(f"labels: expected shape ({embedding_logits_BY.shape[0]},), got "
                         f"{getattr(labels_B, 'shape', type(labels_B).__name__)}")
    ce = F.cross_entropy(embedding_logits_BY, labels_B)
    aux = weight * ce if weight > 0 else zero_loss(embedding_logits_BY)
    acc = (embedding_logits_BY.argmax(-1) == labels_B).float().mean()
    return MoEOutput(embedding_logits_BY, aux, {"embedding_ce": ce.detach(), "embedding_acc": acc.detach()})


def deepmoe_aux_loss(gates: Sequence[Tensor], embedding_logits_BY: Tensor, labels_B: Tensor,
                     l1_weight: float, embedding_weight: float) -> MoEOutput:
    """Both DeepMoE regularisers at once: ``aux_loss = λ Σ_l mean_b ||g^l_b||₁ + μ CE(embedding logits, y)``.

    Returns ``MoEOutput(y = embedding logits, aux_loss, metrics = {gate_l1, embedding_ce, embedding_acc})``
    with the unweighted terms in metrics. (A network's forward returns the λ part as its ``aux_loss``
    and :func:`embedding_loss` the μ part; their sum equals this.)
    """
    lam = _non_negative("l1_weight", l1_weight)
    if len(gates) == 0:
        raise ValueError("gates: expected at least one (B, I) gate tensor")
    l1 = sum((gate_l1(g) for g in gates[1:]), gate_l1(gates[0]))
    emb = embedding_loss(embedding_logits_BY, labels_B, embedding_weight)
    aux = (lam * l1 if lam > 0 else zero_loss(embedding_logits_BY)) + emb.aux_loss
    return MoEOutput(embedding_logits_BY, aux, {"gate_l1": l1.detach(), **emb.metrics})
