"""A small Vision Transformer whose MLPs can be sparse MoE layers: V-MoE (Riquelme et al. 2021).

V-MoE (Riquelme et al. 2021) is a ViT in which the MLP of some encoder blocks is replaced by a sparse MoE:

  * where: every other block ("every-2": 0-indexed blocks 1, 3, 5, ...) or the last n of those;
  * router: ``g(x) = TopK(softmax(x W + ε))``, ``ε ~ N(0, (1/E)²)`` in training only, no bias, top-k
    gates kept as they are (**not** renormalised);
  * losses: ``0.005 · CV(Σ_x softmax(x W))² + 0.005 · CV(load)²`` per MoE block, with V-MoE's smooth
    load ``load_i = mean_x [1 − Φ((threshold_k(x) − (x W)_i) / σ)]``; summed over the MoE blocks;
  * capacity: each expert takes ``C = ceil(T·k·c / E)`` of the T tokens of one *group* (here: the
    batch passed to ``forward``), first choices before second choices; the capacity ratio c can be
    changed at evaluation time (:meth:`ViT.set_capacity_factor`);
  * Batch Priority Routing (:meth:`ViT.set_batch_priority`): tokens are served in descending order of
    their top gate instead of token order, so at small c the least confident tokens are dropped.
    A dropped token skips the MoE and is carried on by the residual connection.

The model reads top to bottom: patch embedding → [CLS] + position embedding → ``depth`` pre-norm blocks
``x = x + Attn(LN(x)); x = x + MLP_or_MoE(LN(x))`` → LN → head on the [CLS] token (or the mean token).

Legend: B batch (images), I input channels, U × X image height × width, L tokens per image (patches, plus one
[CLS] token), D model dim, Y classes (labels), E experts, T tokens in a routing group, C capacity; p is the
patch side (see the package legend). The public ``forward`` arguments keep their historical names:
``x_BCHW`` is a (B, I, U, X) batch, ``x_BND`` a (B, L, D) token table.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.moe import MoE
from moekit.types import MoEOutput, merge_outputs, zero_loss
from moekit._validation import positive_int as _positive_int

#: V-MoE's loss weights (importance and load, each)
VMOE_LOSS_WEIGHT = 0.005


def resolve_moe_layers(moe_layers: str | Sequence[int], depth: int, last_n: int | None = None) -> list[int]:
    """The 0-indexed blocks whose MLP is an MoE.

    ``"every_other"``: blocks 1, 3, 5, ... (V-MoE "every-2"); ``"last_n"``: the last ``last_n`` of those
    (V-MoE "last-n"); a list of block indices: exactly those.
    """
    every_other = list(range(1, depth, 2))
    if isinstance(moe_layers, str):
        if moe_layers == "every_other":
            if last_n is not None:
                raise ValueError("last_n: only used with moe_layers='last_n'")
            return every_other
        if moe_layers == "last_n":
            if not isinstance(last_n, int) or isinstance(last_n, bool) or not 1 <= last_n <= len(every_other):
                raise ValueError(f"last_n: with moe_layers='last_n' must be an int in [1, {len(every_other)}] "
                                 f"(the odd blocks of depth={depth}), got {last_n!r}")
            return every_other[len(every_other) - last_n:]
        raise ValueError(f"moe_layers: expected 'every_other', 'last_n' or a list of block indices, "
                         f"got {moe_layers!r}")
    if not isinstance(moe_layers, (list, tuple)):
        raise TypeError(f"moe_layers: expected 'every_other', 'last_n' or a list of block indices, "
                        f"got {type(moe_layers).__name__}")
    if last_n is not None:
        raise ValueError("last_n: only used with moe_layers='last_n'")
    ids = list(moe_layers)
    for i in ids:
        if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < depth:
            raise ValueError(f"moe_layers: block indices must be ints in [0, depth={depth}), got {moe_layers!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"moe_layers: block indices must be distinct, got {moe_layers!r}")
    return sorted(ids)


class PatchEmbed(nn.Module):
    """Non-overlapping p×p patches, each linearly embedded: (B, I, U, X) -> (B, (U/p)·(X/p), D)."""

    def __init__(self, image_size: int, patch_size: int, in_channels: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_channels, dim, kernel_size=patch_size, stride=patch_size)
        self.num_patches = (image_size // patch_size) ** 2

    def forward(self, x_BCHW: Tensor) -> Tensor:
        return self.proj(x_BCHW).flatten(2).transpose(1, 2)       # (B, D, U/p, X/p) -> (B, L, D)


class Attention(nn.Module):
    """Multi-head self-attention ``softmax(Q Kᵀ / √d) V`` over the L tokens of each image."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x_BND: Tensor) -> Tensor:
        B, L, D = x_BND.shape
        qkv = self.qkv(x_BND).view(B, L, 3, self.heads, D // self.heads)
        q_heads, k_heads, v_heads = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        y_heads = F.scaled_dot_product_attention(q_heads, k_heads, v_heads,
                                                dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y_heads.transpose(1, 2).reshape(B, L, D))


class MLP(nn.Module):
    """The dense ViT MLP: ``Linear(D→mlp_dim) → GELU → Linear(mlp_dim→D)``."""

    def __init__(self, dim: int, hidden_dim: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(F.gelu(self.fc1(x))))


class Block(nn.Module):
    """Pre-norm encoder block ``x = x + Attn(LN(x)); x = x + MLP(LN(x))``, the MLP dense or an MoE.

    ``forward`` returns ``(x, moe_output)`` with ``moe_output`` None for a dense block.
    """

    def __init__(self, dim: int, heads: int, mlp_dim: int, moe: MoE | None = None, dropout: float = 0.0):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dropout)
        self.ln2 = nn.LayerNorm(dim)
        self.moe = moe
        self.mlp = MLP(dim, mlp_dim, dropout) if moe is None else None

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def forward(self, x_BND: Tensor) -> tuple[Tensor, MoEOutput | None]:
        x_BND = x_BND + self.attn(self.ln1(x_BND))
        if self.moe is None:
            return x_BND + self.mlp(self.ln2(x_BND)), None
        out = self.moe(self.ln2(x_BND))      # the whole batch is one routing group (capacity, BPR)
        return x_BND + out.y, out             # a dropped token gets y = 0: the residual carries it


class ViT(nn.Module):
    """A ViT / V-MoE classifier.

    ``ViT(image_size, patch_size, in_channels, num_classes, dim, depth, heads, mlp_dim,
    moe_layers="every_other", num_experts=8, top_k=2, capacity_factor=None, batch_priority=False)``.

    ``forward(x_BCHW) -> MoEOutput(logits_BY, aux_loss, metrics)``: ``aux_loss`` is the sum over the MoE
    blocks of ``w_importance·L_imp + w_load·L_load`` (a zero scalar for a dense ViT); ``metrics`` holds each
    MoE block's metrics under ``moe{i}/...`` (i-th MoE block, in depth order; its block index is
    ``self.moe_layers[i]``) plus ``dropped_fraction`` (dropped / routed assignments over all MoE blocks).

    Args:
        moe_layers: ``"every_other"`` (V-MoE every-2), ``"last_n"`` (with ``last_n``) or a list of block
            indices; ``num_experts=0`` or ``moe_layers=[]`` gives a dense ViT.
        num_experts, top_k: experts per MoE block and experts per token.
        capacity_factor: V-MoE's capacity ratio c (``None`` = no token is dropped).
        batch_priority: Batch Priority Routing (needs a capacity).
        expert_hidden_dim: hidden units of each expert (default ``mlp_dim``, as in V-MoE).
        w_importance, w_load, noise_std: V-MoE router settings (0.005, 0.005, ``"1/E"``).
        pool: ``"cls"`` (a learned [CLS] token, as in ViT) or ``"mean"`` (mean of the patch tokens).
        dispatch: the MoE dispatch (``"sorted"`` fast path, ``"reference"`` dense oracle).
        group_images: route in groups of this many images (V-MoE routes per group of images: each expert's
            capacity and the balancing losses are per group, the losses averaged over groups); ``None`` =
            the whole batch is one group.
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, num_classes: int, dim: int = 64,
                 depth: int = 4, heads: int = 4, mlp_dim: int = 128, moe_layers: str | Sequence[int] = "every_other",
                 num_experts: int = 8, top_k: int = 2, capacity_factor: float | None = None,
                 batch_priority: bool = False, *, last_n: int | None = None, expert_hidden_dim: int | None = None,
                 w_importance: float = VMOE_LOSS_WEIGHT, w_load: float = VMOE_LOSS_WEIGHT,
                 noise_std: float | str = "1/E", pool: str = "cls", dropout: float = 0.0,
                 dispatch: str = "sorted", group_images: int | None = 8):
        super().__init__()
        for name, v in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("num_classes", num_classes), ("dim", dim), ("depth", depth), ("heads", heads),
                        ("mlp_dim", mlp_dim)):
            _positive_int(name, v)
        if image_size % patch_size:
            raise ValueError(f"patch_size: must divide image_size={image_size}, got {patch_size}")
        if dim % heads:
            raise ValueError(f"heads: must divide dim={dim}, got {heads}")
        if not isinstance(num_experts, int) or isinstance(num_experts, bool) or num_experts < 0:
            raise ValueError(f"num_experts: must be a non-negative int (0 = dense ViT), got {num_experts!r}")
        if pool not in ("cls", "mean"):
            raise ValueError(f"pool: expected 'cls' or 'mean', got {pool!r}")
        if not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout: must be a number in [0, 1), got {dropout!r}")
        self.image_size, self.in_channels, self.num_classes = image_size, in_channels, num_classes
        self.dim, self.depth, self.pool = dim, depth, pool
        self.num_experts, self.top_k = num_experts, top_k
        self.moe_layers: list[int] = resolve_moe_layers(moe_layers, depth, last_n) if num_experts > 0 else []
        if expert_hidden_dim is not None:
            _positive_int("expert_hidden_dim", expert_hidden_dim)
        if group_images is not None:
            _positive_int("group_images", group_images)
        self.group_images = group_images

        # --- embeddings ------------------------------------------------------------------------------
        self.patch_embed = PatchEmbed(image_size, patch_size, in_channels, dim)
        n_tokens = self.patch_embed.num_patches + (1 if pool == "cls" else 0)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim)) if pool == "cls" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n_tokens, dim) * 0.02)
        self.drop = nn.Dropout(dropout)

        # --- encoder: dense blocks, and MoE blocks where moe_layers says --------------------------------
        # V-MoE routes per group of images: capacity and balancing losses per group of group_images·n_tokens
        # tokens (a last, smaller batch forms a smaller group).
        group_size = None if group_images is None else group_images * n_tokens
        blocks = []
        for i in range(depth):
            moe = None
            if i in self.moe_layers:
                moe = MoE(dim, expert_hidden_dim or mlp_dim, num_experts, top_k, router="vmoe", expert="mlp",
                          activation="gelu", bias=True, capacity_factor=capacity_factor,
                          batch_priority=batch_priority, dispatch=dispatch, group_size=group_size,
                          router_options={"noise_std": noise_std},   # V-MoE: not renormalised, no Switch loss
                          w_importance=w_importance, w_load=w_load)
            blocks.append(Block(dim, heads, mlp_dim, moe, dropout))
        self.blocks = nn.ModuleList(blocks)

        # --- head ------------------------------------------------------------------------------------
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def extra_repr(self) -> str:
        return (f"depth={self.depth}, dim={self.dim}, moe_layers={self.moe_layers}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, pool={self.pool!r}")

    # ---- evaluation-time routing knobs ----------------------------------------------------------------
    def moe_modules(self) -> list[MoE]:
        """The MoE layers, in depth order (``self.moe_layers[i]`` is the block of the i-th)."""
        return [b.moe for b in self.blocks if b.moe is not None]

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Set the capacity ratio c of every MoE block (``None`` = drop nothing; disable BPR first)."""
        for moe in self.moe_modules():
            moe.set_capacity_factor(capacity_factor)

    def set_batch_priority(self, flag: bool) -> None:
        """Switch Batch Priority Routing on or off in every MoE block (needs a capacity to turn on)."""
        if not isinstance(flag, bool):
            raise TypeError(f"flag: expected a bool, got {type(flag).__name__}")
        for moe in self.moe_modules():
            if flag and moe.capacity_factor is None:
                raise ValueError("flag: batch_priority needs a capacity; call set_capacity_factor(c) first")
        for moe in self.moe_modules():
            moe.set_batch_priority(flag)

    # ---- forward --------------------------------------------------------------------------------------
    def forward(self, x_BCHW: Tensor) -> MoEOutput:
        if not isinstance(x_BCHW, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_BCHW).__name__}")
        if x_BCHW.dim() != 4 or tuple(x_BCHW.shape[1:]) != (self.in_channels, self.image_size, self.image_size):
            raise ValueError(f"x: expected shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(x_BCHW.shape)}")
        x_BND = self.patch_embed(x_BCHW)
        if self.cls_token is not None:
            x_BND = torch.cat([self.cls_token.expand(x_BND.shape[0], -1, -1), x_BND], dim=1)
        x_BND = self.drop(x_BND + self.pos_embed)

        outputs: list[MoEOutput] = []
        for block in self.blocks:
            x_BND, out = block(x_BND)
            if out is not None:
                outputs.append(out)

        x_BND = self.ln_f(x_BND)
        feat_BD = x_BND[:, 0] if self.pool == "cls" else x_BND.mean(dim=1)
        logits_BY = self.head(feat_BD)

        if not outputs:                                    # dense ViT
            return MoEOutput(logits_BY, zero_loss(logits_BY), {})
        aux, metrics = merge_outputs(outputs, prefix="moe")
        routed = x_BND.shape[0] * x_BND.shape[1] * self.top_k * len(outputs)    # T·k per MoE block
        dropped = sum(o.metrics["dropped_assignments"] for o in outputs)
        metrics["dropped_fraction"] = (dropped / routed).detach()
        return MoEOutput(logits_BY, aux, metrics)

