"""A small CondConv CNN for digit images (the ``condconv`` experiment's model).

    stem   conv3×3 I→w                                  (plain conv, as EfficientNet's stem)
    block1 CondConv3×3 w→w                              routing α¹ = r¹(block input)
    block2 CondConv3×3 w→2w,  CondConv3×3 2w→2w         one router per block, α² shared by both layers
    block3 CondConv3×3 2w→4w, CondConv3×3 4w→4w         α³ shared by both layers
    global average pool → linear 4w→Y

Every conv is followed by batch-norm and ReLU (padding 1). ``strides`` gives the stride of each block's
first conv: the default (1, 1, 1) keeps 8×8 digits at 8×8 throughout (on images this small every pixel
matters); (1, 2, 2) takes 28×28 MNIST to 28 → 14 → 7, as CNNs downsample by stage. The kernel-mixing
overhead of CondConv per layer is E/(P·Q) of its conv (P·Q its output map), so a larger P·Q keeps the
MADDs nearly constant as E grows (as in the paper).
``num_experts=1`` is the plain-conv baseline: the blocks use ``nn.Conv2d`` and there are no routers.
Routing is computed once per block from the block input and shared by the block's CondConv layers
(EfficientNet-CondConv's scheme, per its official code). ``routing="softmax"`` with a temperature gives the
Dynamic Convolution variant (Chen et al. 2020; anneal τ with :meth:`CondConvNet.set_temperature`).

Legend: B batch, I input channels, O output channels, U × X image height × width, E experts, Y classes;
w is the ``width`` argument (see the package legend). The public methods' argument keeps its historical
name ``x_BCSS``: a (B, I, U, X) batch.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.condconv import MODES, CondConv2d, CondConvRouter
from moekit._validation import positive_int as _positive_int


class _Block(nn.Module):
    """Conv-BN-ReLU layers at one output resolution (the first conv may downsample by its ``stride``); with
    E > 1 CondConv layers sharing one router, which reads the block input."""

    def __init__(self, in_channels: int, out_channels: int, num_layers: int, num_experts: int, *, mode: str,
                 routing: str, temperature: float, router_reduction: int | None, stride: int = 1):
        super().__init__()
        self.num_experts, self.stride = num_experts, stride
        self.router = (CondConvRouter(in_channels, num_experts, routing=routing, temperature=temperature,
                                      reduction=router_reduction) if num_experts > 1 else None)
        convs, norms = [], []
        c = in_channels
        for i in range(num_layers):
            s = stride if i == 0 else 1               # only the block's first conv downsamples
            if num_experts > 1:
                convs.append(CondConv2d(c, out_channels, 3, num_experts, stride=s, padding=1, bias=False, mode=mode,
                                        routing=routing, temperature=temperature, own_router=False))
            else:
                convs.append(nn.Conv2d(c, out_channels, 3, stride=s, padding=1, bias=False))
            norms.append(nn.BatchNorm2d(out_channels))
            c = out_channels
        self.convs, self.norms = nn.ModuleList(convs), nn.ModuleList(norms)

    def forward(self, x_BIUX: Tensor) -> tuple[Tensor, Tensor | None]:
        alpha_BE = None if self.router is None else self.router(x_BIUX)
        h = x_BIUX
        for conv, norm in zip(self.convs, self.norms):
            h = conv(h) if alpha_BE is None else conv(h, routing_weights=alpha_BE)
            h = F.relu(norm(h))
        return h, alpha_BE

    def output_size(self, size: int) -> int:
        """Side of the block's output maps for ``size`` × ``size`` input maps (3×3 kernels, padding 1)."""
        return (size - 1) // self.stride + 1

    def madds(self, size: int, mode: str) -> int:
        """Per-example MADDs on ``size`` × ``size`` input maps: the router (on the block input) and each conv
        at its output resolution (the first conv's stride sets it for the whole block)."""
        total = 0 if self.router is None else self.router.madds(size)
        for conv in self.convs:
            if isinstance(conv, CondConv2d):
                total += conv.madds(size, mode)
            else:
                out = (size - 1) // conv.stride[0] + 1
                total += conv.out_channels * conv.in_channels * 9 * out * out
            size = (size - 1) // conv.stride[0] + 1
        return total


class CondConvNet(nn.Module):
    """The CNN above with ``num_experts`` experts per CondConv layer (1 = plain convs) for
    ``image_size`` × ``image_size`` inputs, block ``i`` starting with stride ``strides[i]``.

    ``forward(x (B, I, U, X)) -> logits (B, Y)``; :meth:`forward_with_routing` also returns the
    routing weights of each block (list of (B, E), empty for E = 1); :meth:`madds` counts per-example
    multiply-adds (routers, kernel mixing, convs, classifier).
    """

    def __init__(self, num_experts: int, width: int = 8, num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 8, *, mode: str = "auto", routing: str = "sigmoid", temperature: float = 1.0,
                 router_reduction: int | None = None, dropout: float = 0.0,
                 strides: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        for name, v in (("num_experts", num_experts), ("width", width), ("num_classes", num_classes),
                        ("in_channels", in_channels), ("image_size", image_size)):
            _positive_int(name, v)
        if mode not in MODES:
            raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
        strides = tuple(strides)
        if len(strides) != 3 or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in strides):
            raise ValueError(f"strides: expected three integers >= 1 (one per block), got {strides}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: expected a value in [0, 1), got {dropout}")
        self.num_experts, self.width, self.num_classes = num_experts, width, num_classes
        self.in_channels, self.image_size, self.strides = in_channels, image_size, strides
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_norm = nn.BatchNorm2d(width)
        opts = dict(mode=mode, routing=routing, temperature=temperature, router_reduction=router_reduction)
        self.blocks = nn.ModuleList([
            _Block(width, width, 1, num_experts, stride=strides[0], **opts),
            _Block(width, 2 * width, 2, num_experts, stride=strides[1], **opts),
            _Block(2 * width, 4 * width, 2, num_experts, stride=strides[2], **opts),
        ])
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(4 * width, num_classes)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def _check(self, x: object) -> Tensor:
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise TypeError(f"x: expected a floating-point torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4 or tuple(x.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"x: expected shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x.shape)}")
        return x

    def forward_with_routing(self, x_BCSS: Tensor) -> tuple[Tensor, list[Tensor]]:
        """Logits (B, Y) and the routing weights of each block, early to late (list of (B, E))."""
        self._check(x_BCSS)
        h = F.relu(self.stem_norm(self.stem(x_BCSS)))
        alphas: list[Tensor] = []
        for block in self.blocks:
            h, alpha_BE = block(h)
            if alpha_BE is not None:
                alphas.append(alpha_BE)
        h_BO = self.dropout(h.mean(dim=(2, 3)))
        return self.head(h_BO), alphas

    def forward(self, x_BCSS: Tensor) -> Tensor:
        return self.forward_with_routing(x_BCSS)[0]

    def routing_weights(self, x_BCSS: Tensor) -> list[Tensor]:
        """Per-block routing weights (list of (B, E), early to late; empty for num_experts=1)."""
        return self.forward_with_routing(x_BCSS)[1]

    def set_temperature(self, temperature: float) -> None:
        """Set the softmax temperature of every block router (DynamicConv variant)."""
        for block in self.blocks:
            if block.router is not None:
                block.router.set_temperature(temperature)

    def madds(self, mode: str = "mix_kernels") -> int:
        """Per-example multiply-adds: stem, routers, kernel mixing and convs of each block, classifier.

        ``mode="mix_kernels"`` is the paper's count (one conv + a kernel sum per layer and example).
        """
        if mode not in ("mix_kernels", "mix_outputs"):
            raise ValueError(f"mode: expected 'mix_kernels' or 'mix_outputs', got {mode!r}")
        side = self.image_size
        total = self.width * self.in_channels * 9 * side * side          # the stem keeps the input size
        for block in self.blocks:
            total += block.madds(side, mode)
            side = block.output_size(side)
        return total + self.head.in_features * self.head.out_features
