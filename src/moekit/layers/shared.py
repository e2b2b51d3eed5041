"""Shared experts: dense experts every token goes through, added to the routed experts' output.

Legend: T tokens, D model dim.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..config import SharedConfig
from ..experts.bank import ExpertBank


class SharedExperts(nn.Module):
    """``num_experts`` shared experts fused into one expert of ``num_experts · hidden_dim`` units
    (``self.bank``, a one-expert bank), optionally gated per token by ``sigmoid(x w)`` with a learned
    (D,) ``w`` (``self.gate``: Qwen2-MoE, Qwen3-Next)."""

    def __init__(self, bank: ExpertBank, config: SharedConfig):
        super().__init__()
        if not isinstance(bank, ExpertBank) or bank.num_experts != 1:
            raise ValueError("bank: shared experts run as one fused expert (a bank with num_experts=1)")
        self.bank = bank
        self.num_experts, self.hidden_dim = config.num_experts, config.hidden_dim
        self.gate = nn.Linear(bank.dim, 1, bias=False) if config.gated else None

    def config(self) -> SharedConfig:
        return SharedConfig(self.num_experts, self.hidden_dim, self.gate is not None)

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, hidden_dim={self.hidden_dim}, gated={self.gate is not None}"

    def forward(self, x_TD: Tensor) -> Tensor:
        counts_1 = torch.full((1,), x_TD.shape[0], dtype=torch.long, device=x_TD.device)
        y_TD = self.bank(x_TD, counts_1)
        if self.gate is not None:
            y_TD = y_TD * torch.sigmoid(self.gate(x_TD.to(y_TD.dtype)))
        return y_TD
