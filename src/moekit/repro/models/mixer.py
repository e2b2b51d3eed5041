"""MLP-Mixer (Tolstikhin et al. 2021) and Sparse-MLP (Lou et al. 2021, "Cross-token Modeling with
Conditional Computation", arXiv 2109.02008).

MLP-Mixer block on a token table ``X`` (L tokens × D channels):
    ``U = X + (W2 σ(W1 LN(X)ᵀ))ᵀ``      token mixing: one MLP over the L tokens, applied per channel
    ``Y = U + W4 σ(W3 LN(U))``          channel mixing: one MLP over the D channels, applied per token

Sparse-MLP block: both MLPs become top-1 MoE layers (:class:`moekit.MoE`),
    ``U = X + R_out(MoE_S(R_in(LN(X))))``  MoE_S routes each of the D1 *channel vectors* (length L1) of
                                            every image to one token-mixing expert;
    ``Y = U + MoE_C(LN(U))``                MoE_C routes each of the L token vectors (length D) to one
                                            channel-mixing expert.
``R_in`` are the re-represent layers: a linear map along the token axis L → L1 = 2L and one along the
channel axis D → D1 = D/2; ``R_out`` the inverse-shaped maps L1 → L and D1 → D (recalled from the paper, not checked; docs/papers.md).
Routing is V-MoE's: ``gates = softmax(x W + ε)``, ε ~ N(0, (1/E)²) in training, top-1 **not**
renormalised (so the chosen expert's output is scaled by its softmax probability), aux loss
``w_importance·CV(importance)² + w_load·CV(load)²`` (0.005 each).

Legend: B batch, I image channels, U × X image height × width, L tokens (patches) per image, D channels
(model dim), L1 re-represented tokens, D1 re-represented channels, Y classes, E experts (see the package
legend; X, U, Y, Z, W and R in the block formulas are the papers' matrices). The public arguments keep
their historical names: ``x_BSC`` and ``h_BSC`` are (B, L, D) token tables, ``z_BC1S1`` is (B, D1, L1),
``x_BIHW`` a (B, I, U, X) batch.
"""
from __future__ import annotations

from typing import Any, Iterable

from torch import Tensor, nn

from moekit.experts.bank import ACTIVATIONS, ExpertBank, ModuleExperts
from moekit.layers.moe import MoE
from moekit.types import MoEOutput, merge_outputs, zero_loss
from moekit._validation import positive_int as _positive_int

__all__ = ["MixerBlock", "SparseMixerBlock", "MLPMixer", "count_parameters", "sparse_block_indices"]


def _check_activation(activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
    return activation


class _MLP(nn.Module):
    """``y = W_out σ(W_in x + b_in) + b_out`` on the last axis (dim → hidden → dim)."""

    def __init__(self, dim: int, hidden: int, activation: str):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        self.act = ACTIVATIONS[activation]

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class MixerBlock(nn.Module):
    """Dense MLP-Mixer block: ``U = X + (W2 σ(W1 LN(X)ᵀ))ᵀ``, ``Y = U + W4 σ(W3 LN(U))``.

    ``forward(x_BSC) -> MoEOutput(y_BLD, zero aux loss, {})`` — the same interface as
    :class:`SparseMixerBlock`, so a Mixer can hold either kind.
    """

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int, *,
                 activation: str = "gelu"):
        super().__init__()
        for name, v in (("num_tokens", num_tokens), ("dim", dim), ("token_hidden", token_hidden),
                        ("channel_hidden", channel_hidden)):
            _positive_int(name, v)
        _check_activation(activation)
        self.num_tokens, self.dim = num_tokens, dim
        self.norm1 = nn.LayerNorm(dim)
        self.token_mlp = _MLP(num_tokens, token_hidden, activation)      # mixes along L, per channel
        self.norm2 = nn.LayerNorm(dim)
        self.channel_mlp = _MLP(dim, channel_hidden, activation)         # mixes along D, per token

    def forward(self, x_BSC: Tensor) -> MoEOutput:
        _check_tokens(x_BSC, self.num_tokens, self.dim)
        u_BLD = x_BSC + self.token_mlp(self.norm1(x_BSC).transpose(1, 2)).transpose(1, 2)
        y_BLD = u_BLD + self.channel_mlp(self.norm2(u_BLD))
        return MoEOutput(y_BLD, zero_loss(y_BLD), {})


def _check_tokens(x: object, num_tokens: int, dim: int) -> None:
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3 or tuple(x.shape[1:]) != (num_tokens, dim):
        raise ValueError(f"x: expected shape (B, num_tokens={num_tokens}, dim={dim}), got {tuple(x.shape)}")


def _sparse_mlp_moe(dim: int, hidden: int, num_experts: int, top_k: int, *, capacity_factor: float | None,
                    batch_priority: bool, activation: str, w_importance: float, w_load: float,
                    router_options: dict[str, Any] | None, dispatch: str) -> MoE:
    """One Sparse-MLP MoE layer: V-MoE top-k routing (noise 1/E, no renormalisation, no Switch loss),
    Linear–σ–Linear experts with biases (the Mixer's MLP)."""
    options: dict[str, Any] = {"renormalize": False, "noise_std": "1/E", "w_switch": 0.0}
    options.update(router_options or {})
    return MoE(dim, hidden, num_experts, top_k, router="topk", expert="mlp", activation=activation, bias=True,
               capacity_factor=capacity_factor, batch_priority=batch_priority, router_options=options,
               w_importance=w_importance, w_load=w_load, dispatch=dispatch)


class SparseMixerBlock(nn.Module):
    """Sparse-MLP block (Lou et al. 2021): token-mixing MoE_S with re-represent layers, channel-mixing MoE_C.

        ``Z = R_in(LN(X))``      (B, L, D) → (B, D1, L1): ``Z = W_s (LN(X) W_c + b_c)ᵀ + b_s`` — channels
                                 D → D1 = D / channel_reduction, then tokens L → L1 = L · token_expansion
        ``U = X + R_out(MoE_S(Z))``  MoE_S sees B·D1 tokens of length L1 (one per channel of each image);
                                 ``R_out`` maps tokens L1 → L, then channels D1 → D
        ``Y = U + MoE_C(LN(U))``  MoE_C sees B·L tokens of length D (one per patch of each image)

    Each MoE is ``Σ_{i ∈ top-k} p_i(z) E_i(z)``, ``p = softmax(z W)`` (noise ε ~ N(0, (1/E)²) added in
    training), ``E_i(z) = W2_i σ(W1_i z + b1_i) + b2_i``. With ``rerepresent=False`` MoE_S works on the
    original (B, D, L) layout. The aux loss is the sum of both layers' weighted losses; metrics are
    namespaced ``moe_s/...`` and ``moe_c/...``.
    """

    def __init__(self, num_tokens: int, dim: int, token_hidden: int, channel_hidden: int, num_experts: int = 4,
                 top_k: int = 1, *, capacity_factor: float | None = None, batch_priority: bool = False,
                 rerepresent: bool = True, token_expansion: int = 2, channel_reduction: int = 2,
                 activation: str = "gelu", w_importance: float = 0.005, w_load: float = 0.005,
                 router_options: dict[str, Any] | None = None, dispatch: str = "sorted"):
        super().__init__()
        for name, v in (("num_tokens", num_tokens), ("dim", dim), ("token_hidden", token_hidden),
                        ("channel_hidden", channel_hidden), ("num_experts", num_experts), ("top_k", top_k),
                        ("token_expansion", token_expansion), ("channel_reduction", channel_reduction)):
            _positive_int(name, v)
        if top_k > num_experts:
            raise ValueError(f"top_k: must be in [1, num_experts={num_experts}], got {top_k}")
        if not isinstance(rerepresent, bool):
            raise TypeError(f"rerepresent: expected a bool, got {type(rerepresent).__name__}")
        if rerepresent and dim % channel_reduction:
            raise ValueError(f"channel_reduction: must divide dim={dim}, got {channel_reduction}")
        _check_activation(activation)
        self.num_tokens, self.dim, self.rerepresent = num_tokens, dim, rerepresent
        self.moe_tokens = num_tokens * token_expansion if rerepresent else num_tokens     # L1
        self.moe_channels = dim // channel_reduction if rerepresent else dim             # D1
        moe_kw = dict(capacity_factor=capacity_factor, batch_priority=batch_priority, activation=activation,
                      w_importance=w_importance, w_load=w_load, router_options=router_options, dispatch=dispatch)

        self.norm1 = nn.LayerNorm(dim)
        if rerepresent:
            self.channel_in = nn.Linear(dim, self.moe_channels)              # D  → D1
            self.token_in = nn.Linear(num_tokens, self.moe_tokens)           # L  → L1
            self.token_out = nn.Linear(self.moe_tokens, num_tokens)          # L1 → L
            self.channel_out = nn.Linear(self.moe_channels, dim)             # D1 → D
        self.moe_s = _sparse_mlp_moe(self.moe_tokens, token_hidden, num_experts, top_k, **moe_kw)
        self.norm2 = nn.LayerNorm(dim)
        self.moe_c = _sparse_mlp_moe(dim, channel_hidden, num_experts, top_k, **moe_kw)

    def extra_repr(self) -> str:
        return (f"num_tokens={self.num_tokens}, dim={self.dim}, rerepresent={self.rerepresent}, "
                f"moe_s: {self.moe_channels} channel vectors of length {self.moe_tokens} per image")

    def represent(self, h_BSC: Tensor) -> Tensor:
        """``R_in``: the (already normalised) token table (B, L, D) → MoE_S's input (B, D1, L1)."""
        if not self.rerepresent:
            return h_BSC.transpose(1, 2)
        h_BLD1 = self.channel_in(h_BSC)                         # (B, L, D1)
        return self.token_in(h_BLD1.transpose(1, 2))            # (B, D1, L1)

    def unrepresent(self, z_BC1S1: Tensor) -> Tensor:
        """``R_out``: MoE_S's output (B, D1, L1) → the residual branch (B, L, D)."""
        if not self.rerepresent:
            return z_BC1S1.transpose(1, 2)
        z_BD1L = self.token_out(z_BC1S1)                        # (B, D1, L)
        return self.channel_out(z_BD1L.transpose(1, 2))         # (B, L, D)

    def forward(self, x_BSC: Tensor) -> MoEOutput:
        _check_tokens(x_BSC, self.num_tokens, self.dim)
        z_BD1L1 = self.represent(self.norm1(x_BSC))
        out_s = self.moe_s(z_BD1L1)                  # MoE tokens = channel vectors: (B·D1, L1)
        u_BLD = x_BSC + self.unrepresent(out_s.y)
        out_c = self.moe_c(self.norm2(u_BLD))        # MoE tokens = patches: (B·L, D)
        y_BLD = u_BLD + out_c.y
        metrics = {f"moe_s/{k}": v for k, v in out_s.metrics.items()}
        metrics.update({f"moe_c/{k}": v for k, v in out_c.metrics.items()})
        return MoEOutput(y_BLD, out_s.aux_loss + out_c.aux_loss, metrics)


def sparse_block_indices(sparse_blocks: int | str | Iterable[int], depth: int) -> tuple[int, ...]:
    """Which blocks are sparse: an int n = the last n blocks (V-MoE's "last-n"), ``"every-2"`` = blocks
    1, 3, 5, ... (every other block), or an iterable of block indices in [0, depth)."""
    if isinstance(sparse_blocks, bool):
        raise TypeError("sparse_blocks: expected an int, 'every-2' or a sequence of block indices, got a bool")
    if isinstance(sparse_blocks, int):
        if not 0 <= sparse_blocks <= depth:
            raise ValueError(f"sparse_blocks: the number of (last) sparse blocks must be in [0, depth={depth}], "
                             f"got {sparse_blocks}")
        return tuple(range(depth - sparse_blocks, depth))
    if isinstance(sparse_blocks, str):
        if sparse_blocks != "every-2":
            raise ValueError(f"sparse_blocks: unknown pattern {sparse_blocks!r}; use 'every-2', an int (last n "
                             "blocks) or a sequence of block indices")
        return tuple(range(1, depth, 2))
    try:
        idx = list(sparse_blocks)
    except TypeError:
        raise TypeError(f"sparse_blocks: expected an int, 'every-2' or a sequence of block indices, got "
                        f"{type(sparse_blocks).__name__}") from None
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < depth for i in idx) \
            or len(set(idx)) != len(idx):
        raise ValueError(f"sparse_blocks: indices must be distinct ints in [0, depth={depth}), got {idx!r}")
    return tuple(sorted(idx))


class MLPMixer(nn.Module):
    """MLP-Mixer image classifier; the blocks listed in ``sparse_blocks`` are Sparse-MLP blocks.

    ``x (B, I, U, X) → per-patch linear embedding (B, L, D), L = (U/p)·(X/p) → depth × block →
    LayerNorm → mean over tokens → Linear → logits (B, Y)``.

    ``forward(x) -> MoEOutput(logits_BY, aux_loss, metrics)``: ``aux_loss`` is the sum of the sparse
    blocks' weighted losses (zero for a dense Mixer); metrics are namespaced
    ``block{i}/moe_s/<name>`` and ``block{i}/moe_c/<name>`` (i = block index), via
    :func:`moekit.types.merge_outputs`.

    ``sparse_blocks``: an int n (the last n blocks), ``"every-2"`` or block indices; default 0 (dense
    MLP-Mixer). The remaining keywords configure the Sparse-MLP blocks (see :class:`SparseMixerBlock`).
    """

    def __init__(self, image_size: int, patch_size: int, in_channels: int, num_classes: int, dim: int, depth: int,
                 token_hidden: int, channel_hidden: int, sparse_blocks: int | str | Iterable[int] = 0,
                 num_experts: int = 4, top_k: int = 1, capacity_factor: float | None = None, *,
                 batch_priority: bool = False, rerepresent: bool = True, token_expansion: int = 2,
                 channel_reduction: int = 2, activation: str = "gelu", w_importance: float = 0.005,
                 w_load: float = 0.005, router_options: dict[str, Any] | None = None, dispatch: str = "sorted"):
        super().__init__()
        for name, v in (("image_size", image_size), ("patch_size", patch_size), ("in_channels", in_channels),
                        ("num_classes", num_classes), ("dim", dim), ("depth", depth),
                        ("token_hidden", token_hidden), ("channel_hidden", channel_hidden)):
            _positive_int(name, v)
        if image_size % patch_size:
            raise ValueError(f"patch_size: must divide image_size={image_size}, got {patch_size}")
        _check_activation(activation)
        self.image_size, self.patch_size, self.in_channels = image_size, patch_size, in_channels
        self.num_classes, self.dim, self.depth = num_classes, dim, depth
        self.num_tokens = (image_size // patch_size) ** 2
        self.sparse_indices = sparse_block_indices(sparse_blocks, depth)

        L = self.num_tokens
        self.embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)   # per-patch linear map
        blocks: list[nn.Module] = []
        for i in range(depth):
            if i in self.sparse_indices:
                blocks.append(SparseMixerBlock(
                    L, dim, token_hidden, channel_hidden, num_experts, top_k, capacity_factor=capacity_factor,
                    batch_priority=batch_priority, rerepresent=rerepresent, token_expansion=token_expansion,
                    channel_reduction=channel_reduction, activation=activation, w_importance=w_importance,
                    w_load=w_load, router_options=router_options, dispatch=dispatch))
            else:
                blocks.append(MixerBlock(L, dim, token_hidden, channel_hidden, activation=activation))
        self.blocks = nn.ModuleList(blocks)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)

    def moe_layers(self) -> dict[str, MoE]:
        """The routed layers by metric prefix: ``{"block3/moe_s": MoE, "block3/moe_c": MoE, ...}``."""
        out: dict[str, MoE] = {}
        for i in self.sparse_indices:
            blk = self.blocks[i]
            out[f"block{i}/moe_s"], out[f"block{i}/moe_c"] = blk.moe_s, blk.moe_c
        return out

    def set_capacity_factor(self, capacity_factor: float | None) -> None:
        """Change every MoE layer's capacity ratio (e.g. for evaluation)."""
        for moe in self.moe_layers().values():
            moe.set_capacity_factor(capacity_factor)

    def forward(self, x_BIHW: Tensor) -> MoEOutput:
        if not isinstance(x_BIHW, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_BIHW).__name__}")
        if not x_BIHW.is_floating_point():
            raise TypeError(f"x: expected a floating-point tensor, got dtype {x_BIHW.dtype}")
        expected = (self.in_channels, self.image_size, self.image_size)
        if x_BIHW.dim() != 4 or tuple(x_BIHW.shape[1:]) != expected:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, expected))}), got {tuple(x_BIHW.shape)}")
        x_BLD = self.embed(x_BIHW).flatten(2).transpose(1, 2)     # (B, D, U/p, X/p) → (B, L, D)
        outputs = []
        for blk in self.blocks:
            out = blk(x_BLD)
            outputs.append(out)
            x_BLD = out.y
        aux, metrics = merge_outputs(outputs, prefix="block")      # dense blocks add 0 and no metrics
        logits_BY = self.head(self.norm(x_BLD).mean(dim=1))
        return MoEOutput(logits_BY, aux, metrics)


def _expert_sizes(bank: ExpertBank) -> list[int]:
    """Parameters of each expert of a bank."""
    if isinstance(bank, ModuleExperts):
        return [sum(p.numel() for p in e.parameters()) for e in bank.experts]
    E = bank.num_experts
    per = 0
    for name, p in bank.named_parameters():
        if p.dim() == 0 or p.shape[0] != E:
            raise ValueError(f"model: expert bank parameter {name!r} of shape {tuple(p.shape)} is not stacked "
                             f"per expert (leading dim {E}); cannot count active parameters")
        per += p.numel() // E
    return [per] * E


def count_parameters(model: nn.Module) -> dict[str, int]:
    """``{"total": all parameters, "active": parameters one routed token uses}``.

    Active = every parameter outside the experts (embeddings, norms, routers, re-represent layers,
    dense MLPs, shared experts) + for each :class:`moekit.MoE` the ``top_k`` largest experts' worth
    (all experts are the same size in a stacked bank). Only token-choice MoE layers have a fixed number
    of experts per token; others raise ``ValueError``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    total = sum(p.numel() for p in model.parameters())
    active = total
    for name, m in model.named_modules():
        if isinstance(m, MoE):
            if m.kind != "token_choice" or m.top_k is None:
                raise ValueError(f"model: MoE layer {name!r} is not token-choice top-k routed; active parameters "
                                 "per token are not fixed")
            sizes = _expert_sizes(m.experts)
            active -= sum(sizes)
            active += sum(sorted(sizes, reverse=True)[: m.top_k])
    return {"total": int(total), "active": int(active)}
