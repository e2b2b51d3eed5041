"""The speaker-gated vowel mixture of Nowlan & Hinton (NIPS 1990, *Evaluation of Adaptive Mixtures of
Competing Experts*): linear experts that read the formants, and a softmax gate that also reads who speaks
(the speaker group), trained on the Gaussian-mixture error ``−log Σ_i p_i exp(−½‖d − o_i‖²)``.

Legend: T examples, D inputs (the ``expert_dim`` formants, then the speaker one-hot), Y classes, E experts
(see the package legend). The public arguments keep their historical suffixes: ``x_ND`` is (T, D),
``gates_NE`` (T, E), ``outputs_NEC`` (T, E, Y), ``targets_NC`` (T, Y).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from .baselines import reset_linears


class SplitInputMixture(nn.Module):
    """``o_i = W_i x[:, :expert_dim] + b_i`` (the experts see the formants), ``p = softmax(V x + c)`` (the gate sees
    everything: formants and speaker group). ``forward(x_ND) -> (blend_TY = Σ p_i o_i, gates_TE, outputs_TEY)``."""

    def __init__(self, in_dim: int, expert_dim: int, out_dim: int, num_experts: int):
        super().__init__()
        if not 1 <= expert_dim <= in_dim:
            raise ValueError(f"expert_dim: must be in [1, in_dim={in_dim}], got {expert_dim}")
        self.expert_dim, self.out_dim, self.num_experts = expert_dim, out_dim, num_experts
        self.experts = nn.Linear(expert_dim, out_dim * num_experts)
        self.gate = nn.Linear(in_dim, num_experts)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        reset_linears((self.experts, self.gate), generator)

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        out_TEY = self.experts(x_ND[:, :self.expert_dim]).reshape(-1, self.num_experts, self.out_dim)
        gates_TE = torch.softmax(self.gate(x_ND), -1)
        return torch.einsum("te,tey->ty", gates_TE, out_TEY), gates_TE, out_TEY


def mixture_nll(gates_NE: Tensor, outputs_NEC: Tensor, targets_NC: Tensor) -> Tensor:
    """``mean_n −log Σ_i p_i exp(−½‖d − o_i‖²)`` (Jacobs et al. 1991's error function)."""
    sq_TE = (targets_NC[:, None, :] - outputs_NEC).pow(2).sum(-1)
    return -torch.logsumexp(gates_NE.clamp_min(1e-30).log() - 0.5 * sq_TE, dim=-1).mean()


__all__ = ["SplitInputMixture", "mixture_nll"]
