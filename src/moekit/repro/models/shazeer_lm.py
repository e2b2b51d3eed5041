"""The recurrent language model of Shazeer et al. 2017 (Figure 1): embedding → LSTM → MoE → LSTM → softmax.

The MoE layer is applied at every time step (to every position of every sequence, all as one batch of
tokens) between the two LSTM layers. Compute-matched baselines replace the MoE by more LSTM layers
(``4xLSTM``) or use one wide LSTM with an output projection (``LSTM-2048-512`` in the paper).

Legend: B sequences, L sequence length (time steps), T = B·L tokens, V vocabulary, D model dim (embedding /
LSTM output), H expert hidden dim, E experts, K experts per token, P expert groups (the primary gate's
choices), Q experts per group (see the package legend).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moekit._validation import positive_int as _positive_int
from moekit.layers.hierarchical import HierarchicalMoE
from moekit.layers.moe import MoE
from moekit.types import MoEOutput, zero_loss

BLOCKS = ("moe", "hmoe", "lstm", "none")


@dataclass(frozen=True)
class LMCost:
    """Cost of one time step of a :class:`ShazeerLM` (multiply-adds of the forward pass, at inference).

    ``ops_per_timestep`` counts the LSTM layers, the gating networks and the experts a token is routed
    to (or the extra LSTM layers); like the paper's ops/timestep it leaves out the embedding lookup and
    the softmax output layer, which are the same for every model (``softmax_ops`` holds the latter).
    """

    ops_per_timestep: int
    lstm_ops: int
    gate_ops: int
    expert_ops: int
    softmax_ops: int
    params_total: int
    params_active: int       # parameters a token uses: all but the experts it is not routed to
    num_experts: int = 0
    experts_per_token: int = 0
    params_per_expert: int = 0

    def token_visits_per_expert_parameter(self, tokens: int) -> float:
        """How often, on average, each expert parameter is used in training on ``tokens`` tokens:
        ``tokens · experts_per_token / num_experts / params_per_expert`` (0 for a model without experts)."""
        if not self.num_experts or not self.params_per_expert:
            return 0.0
        return tokens * self.experts_per_token / self.num_experts / self.params_per_expert


def lstm_ops(input_dim: int, hidden: int, proj: int | None = None) -> int:
    """Multiply-adds of one LSTM step: four gates over [input, recurrent state] plus the projection."""
    rec = hidden if proj is None else proj
    return 4 * hidden * (input_dim + rec) + (0 if proj is None else hidden * proj)


class ShazeerLM(nn.Module):
    """Character/byte-level version of the paper's language model.

    ``block`` selects what sits between the first and the last LSTM layer:

    * ``"moe"`` — a flat sparsely-gated MoE (:class:`moekit.MoE`, ``router="noisy_topk"``, ``top_k``
      one-hidden-layer ReLU MLP experts ``D → H → D``);
    * ``"hmoe"`` — the two-level :class:`~moekit.layers.hierarchical.HierarchicalMoE`, ``num_groups`` ×
      ``experts_per_group`` experts, ``top_k`` groups and ``top_k`` experts within each;
    * ``"lstm"`` — ``extra_lstm_layers`` more LSTM layers (the ``4xLSTM`` baseline with 2);
    * ``"none"`` — nothing: with ``num_lstm_layers=1`` and ``lstm_hidden > dim`` this is the wide LSTM
      with an output projection to ``dim`` (the ``LSTM-2048-512`` baseline shape).

    Residual connections go around every layer after the first, and dropout is applied to each
    layer's output before it joins the residual stream (and before the softmax)::

        h = LSTM_1(embed(ids));  h = h + drop(block(h));  h = h + drop(LSTM_i(h)) for the next LSTMs
        logits = W_out · drop(h)

    ``forward(ids_BL) -> MoEOutput(logits_BLV, aux_loss, metrics)``; ``aux_loss`` is the MoE's weighted
    balancing loss (a zero scalar for the dense models), ``metrics`` the MoE layer's routing metrics.
    """

    def __init__(self, vocab_size: int = 256, dim: int = 64, *, block: str = "moe", num_experts: int = 4,
                 hidden_dim: int | None = None, top_k: int = 4, num_groups: int | None = None,
                 experts_per_group: int | None = None, extra_lstm_layers: int = 2, num_lstm_layers: int = 2,
                 lstm_hidden: int | None = None, dropout: float = 0.1, w_importance: float = 0.1,
                 w_load: float = 0.1):
        super().__init__()
        if block not in BLOCKS:
            raise ValueError(f"block: expected one of {BLOCKS}, got {block!r}")
        for name, v in (("vocab_size", vocab_size), ("dim", dim), ("num_lstm_layers", num_lstm_layers)):
            _positive_int(name, v)
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise ValueError(f"dropout: must be a number in [0, 1), got {dropout!r}")
        self.vocab_size, self.dim, self.block = vocab_size, dim, block
        self.hidden_dim = 2 * dim if hidden_dim is None else _positive_int("hidden_dim", hidden_dim)
        self.lstm_hidden = dim if lstm_hidden is None else _positive_int("lstm_hidden", lstm_hidden)
        if self.lstm_hidden < dim:
            raise ValueError(f"lstm_hidden: must be >= dim={dim} (a wider LSTM projects down to dim), "
                             f"got {self.lstm_hidden}")
        self.top_k = top_k
        self.embed = nn.Embedding(vocab_size, dim)
        self.drop = nn.Dropout(dropout)
        self.lstms = nn.ModuleList(self._lstm() for _ in range(num_lstm_layers))
        self.middle: nn.Module | None = None
        self.middle_lstms = nn.ModuleList()
        if block == "moe":
            _positive_int("num_experts", num_experts)
            if not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
                raise ValueError(f"top_k: must be an int in [1, num_experts={num_experts}], got {top_k!r}")
            self.middle = MoE(dim, self.hidden_dim, num_experts, top_k, router="noisy_topk", expert="mlp",
                              activation="relu", w_importance=w_importance, w_load=w_load)
        elif block == "hmoe":
            if num_groups is None or experts_per_group is None:
                raise ValueError("num_groups, experts_per_group: both are required with block='hmoe'")
            _positive_int("num_groups", num_groups)
            _positive_int("experts_per_group", experts_per_group)
            self.middle = HierarchicalMoE(dim, self.hidden_dim, num_groups, experts_per_group, top_k, top_k,
                                          expert="mlp", activation="relu", w_importance=w_importance,
                                          w_load=w_load)
        elif block == "lstm":
            _positive_int("extra_lstm_layers", extra_lstm_layers)
            self.middle_lstms.extend(self._lstm() for _ in range(extra_lstm_layers))
        self.head = nn.Linear(dim, vocab_size)

    def _lstm(self) -> nn.LSTM:
        proj = self.dim if self.lstm_hidden > self.dim else 0
        return nn.LSTM(self.dim, self.lstm_hidden, batch_first=True, proj_size=proj)

    @property
    def num_experts(self) -> int:
        return 0 if self.middle is None else self.middle.num_experts

    def _experts_per_token(self) -> int:
        if self.block == "moe":
            return self.top_k
        if self.block == "hmoe":
            return self.top_k * self.top_k
        return 0

    def cost(self) -> LMCost:
        """Multiply-adds per time step and parameter counts (see :class:`LMCost`)."""
        proj = self.dim if self.lstm_hidden > self.dim else None
        n_lstm = len(self.lstms) + len(self.middle_lstms)
        lstm = n_lstm * lstm_ops(self.dim, self.lstm_hidden, proj)
        D, H = self.dim, self.hidden_dim
        gate = expert = 0
        per_expert_params = 0
        if self.block == "moe":
            gate = D * self.num_experts                                  # clean gate logits x·W_g
        elif self.block == "hmoe":
            m: HierarchicalMoE = self.middle  # type: ignore[assignment]
            gate = D * m.P + m.k1 * D * m.B                              # primary gate + the chosen groups' gates
        if self.middle is not None:
            expert = self._experts_per_token() * 2 * D * H
            per_expert_params = sum(p.numel() for p in self.middle.experts.parameters()) // self.num_experts
        total = sum(p.numel() for p in self.parameters())
        active = total - (self.num_experts - self._experts_per_token()) * per_expert_params
        has_experts = self.middle is not None
        return LMCost(ops_per_timestep=lstm + gate + expert, lstm_ops=lstm, gate_ops=gate, expert_ops=expert,
                      softmax_ops=D * self.vocab_size, params_total=total, params_active=active,
                      num_experts=self.num_experts if has_experts else 0,
                      experts_per_token=self._experts_per_token() if has_experts else 0,
                      params_per_expert=per_expert_params)

    def forward(self, ids_BL: Tensor) -> MoEOutput:
        if not isinstance(ids_BL, Tensor) or ids_BL.dtype not in (torch.int64, torch.int32):
            raise TypeError("ids: expected an integer torch.Tensor of token ids")
        if ids_BL.dim() != 2:
            raise ValueError(f"ids: expected shape (batch, time), got {tuple(ids_BL.shape)}")
        h_BLD, _ = self.lstms[0](self.embed(ids_BL))
        aux = zero_loss(h_BLD)
        metrics: dict[str, Tensor] = {}
        if self.middle is not None:
            out = self.middle(h_BLD)                  # every time step of every sequence: T = B·L tokens
            h_BLD = h_BLD + self.drop(out.y)
            aux, metrics = out.aux_loss, out.metrics
        for lstm in [*self.middle_lstms, *self.lstms[1:]]:
            h_BLD = h_BLD + self.drop(lstm(h_BLD)[0])
        return MoEOutput(self.head(self.drop(h_BLD)), aux, metrics)

    def loss(self, ids_BL: Tensor, targets_BL: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """``(mean cross-entropy in nats per token, aux_loss, metrics)`` of next-token prediction."""
        out = self(ids_BL)
        ce = F.cross_entropy(out.y.reshape(-1, self.vocab_size), targets_BL.reshape(-1))
        return ce, out.aux_loss, out.metrics
