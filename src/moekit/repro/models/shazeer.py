"""A small classifier with one sparsely-gated MoE layer (Shazeer et al. 2017), for the load-balancing ablation.

Legend: T examples (one token each), D model dim, H expert hidden dim, E experts, K experts per token,
Y classes (see the package legend). ``forward``'s argument keeps its historical name ``x_NF``: a
(T, in_features) batch.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from moekit.layers.moe import MoE
from moekit.types import MoEOutput
from moekit._validation import positive_int as _positive_int


class ShazeerMoEClassifier(nn.Module):
    """``x → h = ReLU(x W_in + b_in) → h + MoE(h) → logits = (h + MoE(h)) W_out + b_out``.

    The MoE layer is the paper's (eq. 1) ``y = Σ_i G(h)_i E_i(h)`` with noisy top-k gating (eqs. 3–5)
    ``G(h) = softmax(KeepTopK(H(h), k))``, ``H(h)_i = (h W_g)_i + ε_i·(softplus((h W_noise)_i) + 1e-2)``,
    ``W_g`` and ``W_noise`` zero-initialised, and 1-hidden-layer ReLU MLP experts ``E_i(h) = ReLU(h A_i + a_i) B_i + b_i``.
    The layer's ``aux_loss`` is ``w_importance·CV(Importance(X))² + w_load·CV(Load(X))²`` (eqs. 6–7, 10–11)
    over the batch ``X`` given to :meth:`forward`.

    ``forward(x_NF) -> MoEOutput(logits_TY, aux_loss, metrics)`` where ``metrics`` are the MoE layer's
    (tokens_per_expert, cv_importance, cv_load, max_over_mean_load, experts_used, importance_loss, ...).
    """

    def __init__(self, in_features: int = 64, num_classes: int = 10, dim: int = 32, hidden_dim: int = 32,
                 num_experts: int = 16, top_k: int = 2, *, w_importance: float = 0.1, w_load: float = 0.1,
                 expert_bias: bool = True):
        super().__init__()
        for name, v in (("in_features", in_features), ("num_classes", num_classes), ("dim", dim),
                        ("hidden_dim", hidden_dim), ("num_experts", num_experts), ("top_k", top_k)):
            _positive_int(name, v)
        if top_k > num_experts:
            raise ValueError(f"top_k: must be in [1, num_experts={num_experts}], got {top_k}")
        self.in_features, self.num_classes = in_features, num_classes
        self.embed = nn.Linear(in_features, dim)
        # w_importance / w_load are validated (non-negative numbers) by the router.
        self.moe = MoE(dim, hidden_dim, num_experts, top_k, router="noisy_topk", expert="mlp",
                       activation="relu", bias=bool(expert_bias), w_importance=w_importance, w_load=w_load)
        self.head = nn.Linear(dim, num_classes)

    @property
    def num_experts(self) -> int:
        return self.moe.num_experts

    def forward(self, x_NF: Tensor) -> MoEOutput:
        if not isinstance(x_NF, Tensor):
            raise TypeError(f"x: expected a torch.Tensor, got {type(x_NF).__name__}")
        if x_NF.dim() != 2 or x_NF.shape[-1] != self.in_features:
            raise ValueError(f"x: expected shape (T, in_features={self.in_features}), got {tuple(x_NF.shape)}")
        h_TD = F.relu(self.embed(x_NF))      # ReLU embedding: the router sees non-negative features
        out = self.moe(h_TD)
        h_TD = h_TD + out.y                  # residual: a token whose experts are bad still reaches the head
        return MoEOutput(self.head(h_TD), out.aux_loss, out.metrics)
