"""Classic dense mixtures of experts: adaptive mixtures of local experts and hierarchical mixtures.

Legend (the package's, ``moekit/__init__.py``): T examples (any leading dims), D input features,
O output (target) features, E experts, P expert groups (top level of a hierarchy), Q experts per group
(E = P·Q), H hidden units.

Jacobs, Jordan, Nowlan & Hinton (1991), "Adaptive mixtures of local experts": a gating network
produces ``p = softmax(s(x))`` over E experts with outputs ``o_i(x)``. Three error functions:

* cooperative  ``err = ||d − Σ_i p_i o_i||²``        (experts are blended, so they do not localise),
* competitive  ``err = Σ_i p_i ||d − o_i||²``         (each expert is pulled toward the whole target),
* Gaussian mixture (the one the paper uses)
  ``err = −log Σ_i p_i exp(−½ ||d − o_i||²)``          (unit-variance Gaussian experts, constant dropped).

For the Gaussian mixture the gradients are ``∂err/∂o_i = −h_i (d − o_i)`` and ``∂err/∂s_i = p_i − h_i``
with the posterior responsibility ``h_i = p_i exp(−½||d−o_i||²) / Σ_j p_j exp(−½||d−o_j||²)``: an expert only
learns from the cases it is (posterior-)responsible for, and the gate learns to predict that posterior.

With learned variances (a mixture density network, Bishop PRML §14.5.3) the expert density is the full
Gaussian ``Normal(d | o_i, σ_i²)`` including its normalising constant, isotropic (one σ_i per expert) or
diagonal (one σ_io per expert and output), so ``err = −log p(d|x)`` with
``p(d|x) = Σ_i p_i Normal(d | o_i, σ_i²)``.

Jordan & Jacobs (1994) nest the gates: ``p(t|x) = Σ_i g_i(x) Σ_j g_{j|i}(x) p_ij(t|x)``. Flattening the
product ``g_i g_{j|i}`` into one distribution over the E = P·Q leaf experts gives exactly the flat
mixture's form, so :class:`HierarchicalMixtureOfExperts` reuses the same loss functions.

Usage::

    moe = MixtureOfLocalExperts(in_dim=2, out_dim=4, num_experts=4)   # linear experts, linear gate
    out = moe(x_TD)                     # ClassicMoEOutput: y, gates, log_gates, expert_outputs, ...
    loss = moe.loss(out, target_TO)     # the configured error function, mean over examples
    h_TE = out.responsibilities(target_TO)

Unlike the sparse :class:`moekit.layers.MoE`, these models are whole predictors: the mixture loss *is*
the task loss, so they return a :class:`ClassicMoEOutput` rather than ``MoEOutput(y, aux_loss, metrics)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

__all__ = [
    "ClassicMoEOutput",
    "HierarchicalMixtureOfExperts",
    "MixtureOfLocalExperts",
    "competitive_loss",
    "cooperative_loss",
    "expert_log_likelihood",
    "gmm_nll",
    "mixture_loss",
    "posterior_responsibilities",
]

LOSSES = ("gmm", "competitive", "cooperative")
OUTPUTS = ("blend", "argmax")
EXPERTS = ("linear", "mlp")
GATES = ("linear", "mlp")
VARIANCES = ("isotropic", "diagonal")
REDUCTIONS = ("mean", "sum", "none")
_LOG_2PI = math.log(2.0 * math.pi)


# --------------------------------------------------------------------------------------------------
# Loss functions (pure; any leading dims, written for the (T, E, O) case)
# --------------------------------------------------------------------------------------------------

def _check_shapes(gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor) -> None:
    if outputs_TEO.dim() < 2:
        raise ValueError(f"outputs_TEO: expected shape (..., E, O), got {tuple(outputs_TEO.shape)}")
    if gates_TE.shape != outputs_TEO.shape[:-1]:
        raise ValueError(f"gates_TE: expected shape {tuple(outputs_TEO.shape[:-1])} (outputs_TEO without its "
                         f"last dim), got {tuple(gates_TE.shape)}")
    want = outputs_TEO.shape[:-2] + outputs_TEO.shape[-1:]
    if target_TO.shape != want:
        raise ValueError(f"target_TO: expected shape {tuple(want)} (outputs_TEO without its expert dim), "
                         f"got {tuple(target_TO.shape)}")


def _reduce(loss_T: Tensor, reduction: str) -> Tensor:
    if reduction == "mean":
        return loss_T.mean()
    if reduction == "sum":
        return loss_T.sum()
    if reduction == "none":
        return loss_T
    raise ValueError(f"reduction: expected one of {REDUCTIONS}, got {reduction!r}")


def _as_log_gates(gates_TE: Tensor, gates_are_log: bool) -> Tensor:
    # log of a softmax loses precision (and gives inf·0 = nan gradients) once a gate underflows to 0,
    # so modules pass exact log-softmax values with gates_are_log=True.
    return gates_TE if gates_are_log else torch.log(gates_TE)


def expert_log_likelihood(outputs_TEO: Tensor, target_TO: Tensor, log_var: Tensor | None = None) -> Tensor:
    """Per-expert log-density of the target, ``(T, E)``.

    Without ``log_var`` (the 1991 paper): ``−½ ||d − o_i||²`` (unit variance, constant dropped).
    With ``log_var`` (log σ², broadcastable to ``outputs_TEO``: ``(E, 1)``/``(..., E, 1)`` isotropic or
    ``(E, O)``/``(..., E, O)`` diagonal): the full Gaussian
    ``log Normal(d | o_i, σ_i²) = −½ Σ_o [(d_o − o_io)² / σ_io² + log σ_io² + log 2π]``.
    """
    diff_TEO = target_TO.unsqueeze(-2) - outputs_TEO  # d − o_i for every expert
    if log_var is None:
        return -0.5 * diff_TEO.pow(2).sum(-1)
    try:
        shape = torch.broadcast_shapes(log_var.shape, diff_TEO.shape)
    except RuntimeError:
        shape = None
    if shape != diff_TEO.shape:
        raise ValueError(f"log_var: expected a shape broadcastable to outputs {tuple(diff_TEO.shape)} "
                         f"((E, 1) isotropic or (E, O) diagonal), got {tuple(log_var.shape)}")
    return -0.5 * (diff_TEO.pow(2) * torch.exp(-log_var) + log_var + _LOG_2PI).sum(-1)


def gmm_nll(gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor, log_var: Tensor | None = None, *,
            gates_are_log: bool = False, reduction: str = "mean") -> Tensor:
    """Gaussian-mixture negative log-likelihood ``err = −log Σ_i p_i exp(log Normal_i(d))`` (Jacobs et al. eq. 1.3).

    Computed as ``−logsumexp_i(log p_i + log N_i)``, which is stable for far-off targets and sharp gates.
    ``log N_i`` is :func:`expert_log_likelihood`: ``−½||d − o_i||²`` without ``log_var``, the normalised
    Gaussian with it. ``gates_are_log=True`` means ``gates_TE`` already holds ``log p`` (preferred).
    """
    _check_shapes(gates_TE, outputs_TEO, target_TO)
    log_joint_TE = _as_log_gates(gates_TE, gates_are_log) + expert_log_likelihood(outputs_TEO, target_TO, log_var)
    return _reduce(-torch.logsumexp(log_joint_TE, dim=-1), reduction)


def posterior_responsibilities(gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor,
                               log_var: Tensor | None = None, *, gates_are_log: bool = False) -> Tensor:
    """``h_i = p_i Normal_i(d) / Σ_j p_j Normal_j(d)``, shape ``(T, E)``: the posterior probability that
    expert i generated the target. For :func:`gmm_nll`, ``∂err/∂s_i = p_i − h_i`` and
    ``∂err/∂o_i = −h_i (d − o_i)/σ_i²``."""
    _check_shapes(gates_TE, outputs_TEO, target_TO)
    log_joint_TE = _as_log_gates(gates_TE, gates_are_log) + expert_log_likelihood(outputs_TEO, target_TO, log_var)
    return torch.softmax(log_joint_TE, dim=-1)


def competitive_loss(gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor, *, gates_are_log: bool = False,
                     reduction: str = "mean") -> Tensor:
    """``err = Σ_i p_i ||d − o_i||²`` (Jacobs et al. eq. 1.2): every expert chases the whole target,
    weighted by its gate, so the experts compete instead of cancelling each other's residuals."""
    _check_shapes(gates_TE, outputs_TEO, target_TO)
    p_TE = gates_TE.exp() if gates_are_log else gates_TE
    sq_TE = (target_TO.unsqueeze(-2) - outputs_TEO).pow(2).sum(-1)
    return _reduce((p_TE * sq_TE).sum(-1), reduction)


def cooperative_loss(gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor, *, gates_are_log: bool = False,
                     reduction: str = "mean") -> Tensor:
    """``err = ||d − Σ_i p_i o_i||²`` (Jacobs et al. eq. 1.1): the blend is fitted, experts cooperate
    (each one's error signal depends on the others' outputs, so they do not localise)."""
    _check_shapes(gates_TE, outputs_TEO, target_TO)
    p_TE = gates_TE.exp() if gates_are_log else gates_TE
    blend_TO = (p_TE.unsqueeze(-1) * outputs_TEO).sum(-2)
    return _reduce((target_TO - blend_TO).pow(2).sum(-1), reduction)


def mixture_loss(kind: str, gates_TE: Tensor, outputs_TEO: Tensor, target_TO: Tensor,
                 log_var: Tensor | None = None, *, gates_are_log: bool = False, reduction: str = "mean") -> Tensor:
    """Dispatch to :func:`gmm_nll`, :func:`competitive_loss` or :func:`cooperative_loss` by name."""
    if kind == "gmm":
        return gmm_nll(gates_TE, outputs_TEO, target_TO, log_var, gates_are_log=gates_are_log, reduction=reduction)
    if log_var is not None:
        raise ValueError(f"log_var: only the 'gmm' loss uses variances, got loss={kind!r}")
    if kind == "competitive":
        return competitive_loss(gates_TE, outputs_TEO, target_TO, gates_are_log=gates_are_log, reduction=reduction)
    if kind == "cooperative":
        return cooperative_loss(gates_TE, outputs_TEO, target_TO, gates_are_log=gates_are_log, reduction=reduction)
    raise ValueError(f"loss: expected one of {LOSSES}, got {kind!r}")


# --------------------------------------------------------------------------------------------------
# Output container
# --------------------------------------------------------------------------------------------------

@dataclass
class ClassicMoEOutput:
    """What a classic mixture returns. Index e of the expert dim is expert ``e`` (``i·Q + j`` in a hierarchy)."""

    y: Tensor                          # (T, O) prediction: blend Σ p_i o_i, or the most probable expert's o_i
    gates: Tensor                      # (T, E) p_i(x) (the product g_i g_{j|i} in a hierarchy)
    log_gates: Tensor                  # (T, E) exact log p_i(x) from log-softmax; what the losses use
    expert_outputs: Tensor             # (T, E, O) o_i(x)
    log_var: Tensor | None = None      # broadcastable to (T, E, O): learned log σ²; None = unit variance
    group_gates: Tensor | None = None  # (T, P) top-level gate g_i (hierarchy only)
    within_gates: Tensor | None = None  # (T, P, Q) within-group gates g_{j|i} (hierarchy only)

    @property
    def expert_ids(self) -> Tensor:
        """(T,) index of the most probable expert (argmax gate)."""
        return self.gates.argmax(dim=-1)

    @property
    def blend(self) -> Tensor:
        """(T, O) ``Σ_i p_i o_i`` — the mixture mean, whatever ``y`` holds."""
        return (self.gates.unsqueeze(-1) * self.expert_outputs).sum(-2)

    def responsibilities(self, target_TO: Tensor) -> Tensor:
        """(T, E) posterior responsibilities ``h_i`` of the Gaussian-mixture model for these targets."""
        return posterior_responsibilities(self.log_gates, self.expert_outputs, target_TO, self.log_var,
                                          gates_are_log=True)

    def group_responsibilities(self, target_TO: Tensor) -> Tensor:
        """(T, P) posterior of the top-level branches, ``h_i = Σ_j h_ij`` (hierarchy only)."""
        if self.group_gates is None:
            raise ValueError("group_responsibilities: this output has no group structure (flat mixture)")
        h_TE = self.responsibilities(target_TO)
        return h_TE.reshape(*h_TE.shape[:-1], self.group_gates.shape[-1], -1).sum(-1)


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------

class _StackedNet(nn.Module):
    """``copies`` independent one- or two-layer nets evaluated together: ``(..., D) -> (..., copies, out)``.

    Weights are stacked, (copies, D, out) (``weight_CDO``: the parameter names are state-dict keys and
    predate the package legend), so E linear experts cost one einsum rather than E module calls.
    With ``hidden`` set, each copy is ``Linear(D, H) → tanh → Linear(H, out)``. Initialisation matches
    ``nn.Linear`` (uniform ±1/√fan_in) independently per copy, which breaks the symmetry between experts.
    """

    def __init__(self, copies: int, in_dim: int, out_dim: int, hidden: int | None = None):
        super().__init__()
        self.hidden = hidden
        first = out_dim if hidden is None else hidden
        self.weight_CDO = nn.Parameter(torch.empty(copies, in_dim, first))
        self.bias_CO = nn.Parameter(torch.empty(copies, first))
        if hidden is not None:
            self.weight2_CHO = nn.Parameter(torch.empty(copies, hidden, out_dim))
            self.bias2_CO = nn.Parameter(torch.empty(copies, out_dim))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for w, b in [(self.weight_CDO, self.bias_CO)] + (
                [(self.weight2_CHO, self.bias2_CO)] if self.hidden is not None else []):
            bound = 1.0 / math.sqrt(w.shape[1])
            nn.init.uniform_(w, -bound, bound, generator=generator)
            nn.init.uniform_(b, -bound, bound, generator=generator)

    def forward(self, x_TD: Tensor) -> Tensor:
        h = torch.einsum("...d,cdo->...co", x_TD, self.weight_CDO) + self.bias_CO     # (T, copies, out)
        if self.hidden is None:
            return h
        # second layer: each copy reads its own hidden units (T, copies, H) -> (T, copies, O)
        return torch.einsum("...ch,cho->...co", torch.tanh(h), self.weight2_CHO) + self.bias2_CO


class _ModuleExperts(nn.Module):
    """Experts built by a user factory ``(in_dim, out_dim) -> nn.Module`` mapping (..., D) to (..., O)."""

    def __init__(self, factory: Callable[[int, int], nn.Module], copies: int, in_dim: int, out_dim: int):
        super().__init__()
        self.experts = nn.ModuleList(factory(in_dim, out_dim) for _ in range(copies))

    def forward(self, x_TD: Tensor) -> Tensor:
        return torch.stack([e(x_TD) for e in self.experts], dim=-2)  # (T, E, O)


def _check_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name}: expected a positive int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name}: expected a positive int, got {value}")
    return value


def _check_choice(name: str, value: object, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {allowed}, got {value!r}")
    return value  # type: ignore[return-value]


def _build_experts(expert, copies: int, in_dim: int, out_dim: int, hidden: int) -> nn.Module:
    if expert is None or expert == "linear":
        return _StackedNet(copies, in_dim, out_dim)
    if expert == "mlp":
        return _StackedNet(copies, in_dim, out_dim, hidden=hidden)
    if callable(expert) and not isinstance(expert, str):
        return _ModuleExperts(expert, copies, in_dim, out_dim)
    raise ValueError(f"expert: expected None, one of {EXPERTS} or a factory (in_dim, out_dim) -> nn.Module, "
                     f"got {expert!r}")


class _ClassicMixture(nn.Module):
    """Shared machinery: experts, optional learned variances, loss and test-time output rule."""

    def __init__(self, in_dim: int, out_dim: int, num_experts: int, expert, expert_hidden: int, gate: str,
                 gate_hidden: int, loss: str, learn_variance: bool | str | None, output: str):
        super().__init__()
        self.in_dim = _check_int("in_dim", in_dim)
        self.out_dim = _check_int("out_dim", out_dim)
        self.num_experts = _check_int("num_experts", num_experts)
        _check_int("expert_hidden", expert_hidden)
        self.gate_hidden = _check_int("gate_hidden", gate_hidden)
        self.gate_kind = _check_choice("gate", gate, GATES)
        self.loss_kind = _check_choice("loss", loss, LOSSES)
        self.output = _check_choice("output", output, OUTPUTS)
        if learn_variance is True:
            learn_variance = "isotropic"
        if learn_variance is False or learn_variance is None:
            self.variance = None
        else:
            self.variance = _check_choice("learn_variance", learn_variance, VARIANCES)
            if loss != "gmm":
                raise ValueError(f"learn_variance: a learned variance needs loss='gmm', got loss={loss!r}")
        self.experts = _build_experts(expert, num_experts, in_dim, out_dim, expert_hidden)
        if self.variance is not None:
            # log σ² per expert, (E, 1) isotropic or (E, O) diagonal; 0 = unit variance as in the paper
            cols = 1 if self.variance == "isotropic" else out_dim
            self.log_var_EO = nn.Parameter(torch.zeros(num_experts, cols))
        else:
            self.register_parameter("log_var_EO", None)

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """Re-draw all weights (``nn.Linear``'s uniform ±1/√fan_in), from ``generator`` when given, so that a
        seeded model can be built without touching the global RNG. Learned log-variances restart at 0.
        Custom (factory-built) experts are reset with their own ``reset_parameters()``."""
        for m in self.modules():
            if isinstance(m, _StackedNet):
                m.reset_parameters(generator)
            elif m is not self and hasattr(m, "reset_parameters") and not isinstance(m, _ClassicMixture):
                m.reset_parameters()
        if self.log_var_EO is not None:
            with torch.no_grad():
                self.log_var_EO.zero_()

    def _gate_net(self, copies: int, out: int) -> _StackedNet:
        return _StackedNet(copies, self.in_dim, out, hidden=self.gate_hidden if self.gate_kind == "mlp" else None)

    def _check_input(self, x_TD: Tensor) -> None:
        if not isinstance(x_TD, Tensor):
            raise TypeError(f"x: expected a Tensor, got {type(x_TD).__name__}")
        if x_TD.dim() < 1 or x_TD.shape[-1] != self.in_dim:
            raise ValueError(f"x: expected shape (..., {self.in_dim}), got {tuple(x_TD.shape)}")

    def _finish(self, x_TD: Tensor, log_gates_TE: Tensor, **extra) -> ClassicMoEOutput:
        outputs_TEO = self.experts(x_TD)
        gates_TE = log_gates_TE.exp()
        if self.output == "blend":
            y_TO = (gates_TE.unsqueeze(-1) * outputs_TEO).sum(-2)
        else:  # the most probable expert's output (a hard, non-differentiable choice of expert)
            idx = gates_TE.argmax(-1, keepdim=True).unsqueeze(-1).expand(*outputs_TEO.shape[:-2], 1,
                                                                         outputs_TEO.shape[-1])
            y_TO = outputs_TEO.gather(-2, idx).squeeze(-2)
        return ClassicMoEOutput(y=y_TO, gates=gates_TE, log_gates=log_gates_TE, expert_outputs=outputs_TEO,
                                log_var=self.log_var_EO, **extra)

    def loss(self, out: ClassicMoEOutput, target_TO: Tensor, reduction: str = "mean") -> Tensor:
        """The configured error function (``loss=`` at construction) of ``out`` against ``target_TO``."""
        if not isinstance(out, ClassicMoEOutput):
            raise TypeError(f"out: expected the ClassicMoEOutput returned by forward, got {type(out).__name__}")
        return mixture_loss(self.loss_kind, out.log_gates, out.expert_outputs, target_TO, out.log_var,
                            gates_are_log=True, reduction=reduction)

    def extra_repr(self) -> str:
        return (f"in_dim={self.in_dim}, out_dim={self.out_dim}, num_experts={self.num_experts}, "
                f"gate={self.gate_kind!r}, loss={self.loss_kind!r}, variance={self.variance!r}, "
                f"output={self.output!r}")


# --------------------------------------------------------------------------------------------------
# Public modules
# --------------------------------------------------------------------------------------------------

class MixtureOfLocalExperts(_ClassicMixture):
    """Adaptive mixture of local experts (Jacobs et al. 1991): ``p(d|x) = Σ_i p_i(x) Normal(d | o_i(x), σ_i²)``.

    Args:
        in_dim, out_dim: input and target sizes.
        num_experts: E.
        expert: ``None``/``"linear"`` (single-layer experts, as in the paper), ``"mlp"`` (``D→H→O`` with tanh),
            or a factory ``(in_dim, out_dim) -> nn.Module``.
        expert_hidden: H for ``expert="mlp"``.
        gate: ``"linear"`` (``s(x) = W x + b``, as in the paper) or ``"mlp"`` (``gate_hidden`` tanh units).
        loss: ``"gmm"`` (−log Σ p_i exp(−½||d−o_i||²), the paper's choice), ``"competitive"`` or ``"cooperative"``.
        learn_variance: ``False`` (unit variance), ``"isotropic"``/``True`` (one σ_i per expert) or
            ``"diagonal"`` (σ_io per expert and output); the likelihood then includes the normalising constant.
        output: test-time prediction ``y``: ``"blend"`` ``Σ p_i o_i`` or ``"argmax"`` (most probable expert's o_i).
    """

    def __init__(self, in_dim: int, out_dim: int, num_experts: int, expert=None, expert_hidden: int = 16,
                 gate: str = "linear", gate_hidden: int = 16, loss: str = "gmm",
                 learn_variance: bool | str | None = False, output: str = "blend"):
        super().__init__(in_dim, out_dim, num_experts, expert, expert_hidden, gate, gate_hidden, loss,
                         learn_variance, output)
        self.gate = self._gate_net(1, num_experts)  # s(x): (T, 1, E)

    def forward(self, x_TD: Tensor) -> ClassicMoEOutput:
        self._check_input(x_TD)
        logits_TE = self.gate(x_TD).squeeze(-2)
        return self._finish(x_TD, torch.log_softmax(logits_TE, dim=-1))


class HierarchicalMixtureOfExperts(_ClassicMixture):
    """Two-level hierarchical mixture (Jordan & Jacobs 1994): ``p(t|x) = Σ_i g_i(x) Σ_j g_{j|i}(x) p_ij(t|x)``.

    A top gate ``g = softmax(u(x))`` over P groups and one gate per group ``g_{·|i} = softmax(v_i(x))`` over
    its Q experts. Leaf expert ``(i, j)`` is expert ``e = i·Q + j`` of the flattened output, whose gate is
    ``g_i g_{j|i}`` (``log g_i + log g_{j|i}`` exactly), so all losses of the flat mixture apply unchanged.
    Arguments as :class:`MixtureOfLocalExperts`, with ``num_groups`` (P) and ``experts_per_group`` (Q).
    """

    def __init__(self, in_dim: int, out_dim: int, num_groups: int, experts_per_group: int, expert=None,
                 expert_hidden: int = 16, gate: str = "linear", gate_hidden: int = 16, loss: str = "gmm",
                 learn_variance: bool | str | None = False, output: str = "blend"):
        _check_int("num_groups", num_groups)
        _check_int("experts_per_group", experts_per_group)
        super().__init__(in_dim, out_dim, num_groups * experts_per_group, expert, expert_hidden, gate,
                         gate_hidden, loss, learn_variance, output)
        self.num_groups = num_groups
        self.experts_per_group = experts_per_group
        self.top_gate = self._gate_net(1, num_groups)                    # u(x): (T, 1, P)
        self.group_gates = self._gate_net(num_groups, experts_per_group)  # v_i(x): (T, P, Q)

    def forward(self, x_TD: Tensor) -> ClassicMoEOutput:
        self._check_input(x_TD)
        log_top_TP = torch.log_softmax(self.top_gate(x_TD).squeeze(-2), dim=-1)
        log_within_TPQ = torch.log_softmax(self.group_gates(x_TD), dim=-1)
        # log(g_i g_{j|i}) flattened so that expert e = i·Q + j
        log_gates_TE = (log_top_TP.unsqueeze(-1) + log_within_TPQ).flatten(-2)
        return self._finish(x_TD, log_gates_TE, group_gates=log_top_TP.exp(), within_gates=log_within_TPQ.exp())

    def extra_repr(self) -> str:
        return f"num_groups={self.num_groups}, experts_per_group={self.experts_per_group}, " + super().extra_repr()
