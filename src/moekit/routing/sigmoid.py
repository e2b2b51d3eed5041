"""Sigmoid scoring with auxiliary-loss-free bias balancing (DeepSeek-V3): a preset of the scored router.

Legend: T tokens, D model dim, E experts, K experts per token.
"""
from __future__ import annotations

from .scored import ScoredTopKRouter


class SigmoidRouter(ScoredTopKRouter):
    """Scores ``s = sigmoid(x W)``; the top k are chosen on ``s + b`` where ``b`` is a per-expert bias
    that is *not* trained by gradients: :meth:`update_bias` nudges it after each step,
    ``b_i ← b_i + u · sign(mean_load − load_i)``. Combine weights use the unbiased scores, normalised
    over the k chosen (``normalize=True``) and multiplied by ``scale``.

    The same router as ``scored`` with ``score="sigmoid", selection_bias=True`` (one implementation
    of the bias balancing, synced over ``bias_group`` under expert parallelism).
    """

    #: options of the scored router this preset sets itself
    fixed_options = ("score", "selection_bias", "renormalize")

    def __init__(self, dim: int, num_experts: int, top_k: int = 2, *, bias_update_rate: float = 1e-3,
                 normalize: bool = True, scale: float = 1.0, **kwargs):
        super().__init__(dim, num_experts, top_k, score="sigmoid", selection_bias=True,
                         bias_update_rate=bias_update_rate, renormalize=bool(normalize), scale=scale, **kwargs)
        self.normalize = bool(normalize)
