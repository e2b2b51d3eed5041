"""A small ResNet for digit images with DeepMoE channel gating (Wang et al. 2019), and its plain baseline.

Architecture (``c = round(base_channels · width_multiplier)``): stem 3×3 conv 1→c at the input's U × X,
three stages of basic blocks with widths c, 2c, 4c (the first block of stages 2 and 3 has stride 2 and
padding 1, so each halves the side, rounding up: 8×8 → 4×4 → 2×2 for the 8×8 digits, 14×14 → 7×7 → 4×4
for MNIST pooled to 14×14), global average pooling and a linear classifier. Any U × X ≥ 1 works. A basic block is
``y = ReLU(conv2(g2 ⊙ ReLU(conv1(g1 ⊙ x))) + shortcut(x))`` (shortcut: identity, or a 1×1 conv when the
shape changes). With ``gated=True`` both block convolutions are :class:`GatedConv2d` layers whose gates
come from one :class:`MultiHeadGate` on a :class:`ShallowEmbedding` of the image; with ``gated=False``
the same network runs with no gates (the plain CNN baseline).

The paper's variants: *wide* = double the channels and gate (``width_multiplier=2``), *narrow* = gate the
original width (``width_multiplier=1``).

There is no batch norm: a BN after a gated convolution normalises away a common rescaling of that
layer's gates, so the L1 penalty could shrink all gates for free until the channels die. Without BN the
gate magnitudes carry meaning and the eval-time skip path is exactly the dense path.

Legend: B batch, I input channels and O output channels of a convolution, U × X height × width, D embedding
dim, Y classes; the gated layers are counted in words (see the package legend). The public arguments keep
their historical names: ``x_BCHW`` is a (B, I, U, X) batch, ``g1_BC`` (B, I) and ``g2_BC`` (B, O) are a
block's gates.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.deepmoe import (DeepMoEOutput, GatedConv2d, MultiHeadGate, ShallowEmbedding, conv_macs,
                              embedding_loss, gate_l1)
from moekit.types import MoEOutput, merge_outputs, zero_loss
from moekit._validation import positive_int as _positive_int


class GatedBasicBlock(nn.Module):
    """``y = ReLU(conv2(g2 ⊙ ReLU(conv1(g1 ⊙ x))) + shortcut(x))``; gates ``None`` → the plain block."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = GatedConv2d(in_channels, out_channels, 3, stride=stride)
        self.conv2 = GatedConv2d(out_channels, out_channels, 3)
        self.shortcut = (nn.Conv2d(in_channels, out_channels, 1, stride=stride)
                         if stride != 1 or in_channels != out_channels else None)

    def forward(self, x_BCHW: Tensor, g1_BC: Tensor | None, g2_BC: Tensor | None
                ) -> tuple[Tensor, list[MoEOutput], int]:
        """Returns the block output, the two gated-conv outputs and the shortcut's MACs per example."""
        dead_out = (not self.training and g2_BC is not None and self.conv1.skip_zero_channels
                    and bool((g2_BC == 0).all(0).any()))
        o1 = self._conv1_live(x_BCHW, g1_BC, g2_BC) if dead_out else self.conv1(x_BCHW, g1_BC)
        o2 = self.conv2(F.relu(o1.y), g2_BC)
        if self.shortcut is None:
            return F.relu(o2.y + x_BCHW), [o1, o2], 0
        s = self.shortcut(x_BCHW)
        macs = conv_macs(self.shortcut.in_channels, self.shortcut.out_channels, 1, s.shape[2], s.shape[3])
        return F.relu(o2.y + s), [o1, o2], macs


    def _conv1_live(self, x_BIUX: Tensor, g1_BI: Tensor | None, g2_BO: Tensor) -> MoEOutput:
        """conv1 at eval time computing only the output channels conv2 reads: an output channel whose second
        gate is zero for every example of the batch is multiplied by 0 in conv2, so it is left at 0 and not
        computed. With ``g1_BI`` the zero-gated input channels are skipped too (as :class:`GatedConv2d` does).
        MAC counts: ``executed`` = live inputs × live outputs × k²·U·X of this batch; ``ideal`` = the mean over
        examples of that product with the example's own nonzero gates."""
        conv = self.conv1
        B, _, U, X = x_BIUX.shape
        Uo, Xo = conv.output_size(U, X)
        per_pair = conv.kernel_size * conv.kernel_size * Uo * Xo          # MACs of one (input, output) channel pair
        out_idx = (g2_BO != 0).any(0).nonzero().squeeze(1)
        if g1_BI is None:
            xg, w = x_BIUX, conv.weight
            in_B = torch.full((B,), float(conv.in_channels), dtype=torch.float64)
            n_in = conv.in_channels
        else:
            in_idx = (g1_BI != 0).any(0).nonzero().squeeze(1)
            xg = x_BIUX.index_select(1, in_idx) * g1_BI.index_select(1, in_idx)[:, :, None, None]
            w = conv.weight.index_select(1, in_idx)
            in_B = (g1_BI != 0).sum(1).double().cpu()
            n_in = int(in_idx.numel())
        bias = None if conv.bias is None else conv.bias.index_select(0, out_idx)
        y = x_BIUX.new_zeros(B, conv.out_channels, Uo, Xo)
        if out_idx.numel() and n_in:
            y = y.index_copy(1, out_idx, F.conv2d(xg, w.index_select(0, out_idx), bias, conv.stride, conv.padding))
        elif out_idx.numel() and bias is not None:
            y = y.index_copy(1, out_idx, bias[None, :, None, None].expand(B, -1, Uo, Xo).contiguous())
        out_B = (g2_BO != 0).sum(1).double().cpu()
        metrics = {
            "macs_executed": torch.tensor(float(n_in * int(out_idx.numel()) * per_pair), dtype=torch.float64),
            "macs_ideal": (in_B * out_B).mean() * per_pair,
            "macs_dense": torch.tensor(float(conv.in_channels * conv.out_channels * per_pair), dtype=torch.float64),
            "active_channels": torch.tensor(float(n_in)),
        }
        if g1_BI is None:
            return MoEOutput(y, zero_loss(x_BIUX), metrics)
        l1 = gate_l1(g1_BI)
        metrics |= {"gate_l1": l1.detach(), "zero_gates": (g1_BI == 0).float().mean().detach()}
        return MoEOutput(y, conv.l1_weight * l1 if conv.l1_weight > 0 else zero_loss(x_BIUX), metrics)


class DeepMoEResNet(nn.Module):
    """Small ResNet with DeepMoE gating on every block convolution (or none: ``gated=False``).

    Objective (paper): ``L = CE(y, labels) + λ Σ_l mean_b ||g^l_b||₁ + μ CE(embedding logits, labels)``,
    formed in the training step as
    ``CE(out.y, labels) + out.aux_loss + model.embedding_loss(out, labels).aux_loss``; ``λ`` is
    ``l1_weight`` (carried by the gated convs, so ``out.aux_loss`` is the λ term) and ``μ`` is
    ``embedding_weight``. Phase 2: :meth:`freeze_gates` freezes the embedding and gate heads and sets
    ``λ = μ = 0``; the base network is then fine-tuned.

    ``forward(x_BCHW) -> DeepMoEOutput(logits_BY, aux_loss, metrics, embedding_logits_BY, gates)``.
    Whole-network metrics (per example): ``macs_executed`` (what this call computed, including the
    embedding network and gate heads), ``macs_ideal`` (with per-example skipping), ``macs_dense`` (this
    network with every channel computed), ``flops_ratio`` = executed / dense, ``zero_gates`` (fraction of
    all gate entries that are exactly zero), ``gate_l1`` (unweighted Σ_l mean_b ||g^l_b||₁); per gated conv
    ``conv{l}/...`` (see :class:`GatedConv2d`).
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, *, width_multiplier: float = 1.0,
                 base_channels: int = 8, blocks_per_stage: Sequence[int] = (1, 1, 1), gated: bool = True,
                 embed_dim: int = 32, embed_channels: Sequence[int] = (8, 16), gate_bias: bool = True,
                 gate_bias_init: float = 1.0, l1_weight: float = 0.0, embedding_weight: float = 0.0):
        super().__init__()
        _positive_int("num_classes", num_classes)
        _positive_int("in_channels", in_channels)
        _positive_int("base_channels", base_channels)
        if isinstance(width_multiplier, bool) or not isinstance(width_multiplier, (int, float)) \
                or not width_multiplier > 0:
            raise ValueError(f"width_multiplier: must be a positive number, got {width_multiplier!r}")
        blocks = list(blocks_per_stage)
        if not blocks:
            raise ValueError("blocks_per_stage: expected at least one stage, got an empty sequence")
        for i, n in enumerate(blocks):
            _positive_int(f"blocks_per_stage[{i}]", n)
        if not isinstance(gated, bool):
            raise TypeError(f"gated: expected a bool, got {type(gated).__name__}")
        c = max(1, int(round(base_channels * width_multiplier)))
        self.num_classes, self.in_channels, self.gated = num_classes, in_channels, gated
        self.width_multiplier, self.widths = float(width_multiplier), [c * 2 ** s for s in range(len(blocks))]
        self.stem = nn.Conv2d(in_channels, c, 3, padding=1)
        block_list: list[GatedBasicBlock] = []
        prev = c
        for s, (n, w) in enumerate(zip(blocks, self.widths)):
            for i in range(n):
                block_list.append(GatedBasicBlock(prev, w, stride=2 if (s > 0 and i == 0) else 1))
                prev = w
        self.blocks = nn.ModuleList(block_list)
        self.head = nn.Linear(prev, num_classes)
        self.gate_channels = [ch for b in self.blocks for ch in (b.conv1.in_channels, b.conv2.in_channels)]
        if gated:
            self.embedding = ShallowEmbedding(in_channels, embed_dim, num_classes, channels=embed_channels)
            self.gate = MultiHeadGate(embed_dim, self.gate_channels, bias=gate_bias, bias_init=gate_bias_init)
        else:
            self.embedding, self.gate = None, None
        self.gates_frozen = False
        self.set_loss_weights(l1_weight, embedding_weight)

    # ----------------------------------------------------------------------------------- loss weights
    def gated_convs(self) -> list[GatedConv2d]:
        return [conv for b in self.blocks for conv in (b.conv1, b.conv2)]

    def set_loss_weights(self, l1_weight: float, embedding_weight: float) -> None:
        """Set λ (on every gated conv) and μ. An ungated network accepts only zeros."""
        for name, v in (("l1_weight", l1_weight), ("embedding_weight", embedding_weight)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise ValueError(f"{name}: must be a non-negative number, got {v!r}")
            if not self.gated and v > 0:
                raise ValueError(f"{name}: must be 0 for an ungated network (gated=False), got {v!r}")
        for conv in self.gated_convs():
            conv.l1_weight = float(l1_weight)
        self.l1_weight, self.embedding_weight = float(l1_weight), float(embedding_weight)

    def freeze_gates(self) -> None:
        """Phase 2: freeze the embedding network and gate heads, and set ``λ = μ = 0``."""
        if not self.gated:
            raise ValueError("freeze_gates: the network is ungated (gated=False); there are no gates to freeze")
        for module in (self.embedding, self.gate):
            for p in module.parameters():
                p.requires_grad_(False)
        self.set_loss_weights(0.0, 0.0)
        self.gates_frozen = True

    def embedding_loss(self, out: DeepMoEOutput, labels_B: Tensor) -> MoEOutput:
        """The μ term for this forward's embedding logits (zero loss for an ungated network)."""
        if out.embedding_logits is None:
            return MoEOutput(out.y, zero_loss(out.y), {})
        return embedding_loss(out.embedding_logits, labels_B, self.embedding_weight)

    # ------------------------------------------------------------------------------------------ forward
    def overhead_macs(self, height: int, width: int) -> int:
        """MACs per example of the gating (embedding network + gate heads); 0 when ungated."""
        if not self.gated:
            return 0
        return self.embedding.macs(height, width) + self.gate.macs()

    def forward(self, x_BCHW: Tensor) -> DeepMoEOutput:
        if not isinstance(x_BCHW, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_BCHW).__name__}")
        if x_BCHW.dim() != 4 or x_BCHW.shape[1] != self.in_channels:
            raise ValueError(f"x: expected shape (B, in_channels={self.in_channels}, U, X), got {tuple(x_BCHW.shape)}")
        _, _, U, X = x_BCHW.shape
        if self.gated:
            e_BD, emb_logits_BY = self.embedding(x_BCHW)
            gates = self.gate(e_BD)
        else:
            emb_logits_BY, gates = None, []
        h = F.relu(self.stem(x_BCHW))
        fixed = conv_macs(self.in_channels, self.stem.out_channels, 3, h.shape[2], h.shape[3])
        fixed += self.overhead_macs(U, X) + self.head.in_features * self.head.out_features
        conv_outs: list[MoEOutput] = []
        for i, block in enumerate(self.blocks):
            g1, g2 = (gates[2 * i], gates[2 * i + 1]) if self.gated else (None, None)
            h, outs, sc_macs = block(h, g1, g2)
            conv_outs += outs
            fixed += sc_macs
        logits_BY = self.head(h.mean(dim=(2, 3)))

        aux, metrics = merge_outputs(conv_outs, prefix="conv")
        for key in ("macs_executed", "macs_ideal", "macs_dense"):
            metrics[key] = torch.tensor(sum(float(o.metrics[key]) for o in conv_outs) + fixed, dtype=torch.float64)
        metrics["flops_ratio"] = metrics["macs_executed"] / metrics["macs_dense"]
        if self.gated:
            n_gates = sum(g.numel() for g in gates)
            metrics["zero_gates"] = (sum(float((g == 0).sum()) for g in gates) / n_gates) * torch.ones(())
            metrics["gate_l1"] = sum(o.metrics["gate_l1"] for o in conv_outs)
        return DeepMoEOutput(logits_BY, aux, metrics, emb_logits_BY, gates)


def deepmoe_resnet(variant: str, **kwargs) -> DeepMoEResNet:
    """The paper's variants on this ResNet: ``"narrow"`` (gated, ×1), ``"wide"`` (gated, ×2),
    ``"plain"`` (ungated ×1 baseline) and ``"plain-wide"`` (ungated ×2)."""
    table = {"narrow": (1.0, True), "wide": (2.0, True), "plain": (1.0, False), "plain-wide": (2.0, False)}
    if variant not in table:
        raise ValueError(f"variant: expected one of {sorted(table)}, got {variant!r}")
    wm, gated = table[variant]
    return DeepMoEResNet(width_multiplier=kwargs.pop("width_multiplier", wm), gated=gated, **kwargs)


__all__ = ["DeepMoEResNet", "GatedBasicBlock", "deepmoe_resnet"]
