"""Chen, Deng, Wu, Gu & Li 2022, "Towards Understanding Mixture of Experts in Deep Learning".

The patch-wise CNN experts, the noisy top-1 MoE and the single-model baselines of the synthetic
cluster task, all vectorised over R independent runs (seeds) so that ten seeds train in one pass.
Everything follows the authors' official code; choices the paper leaves open are noted where they are
made. The data generator is :mod:`moekit.repro.datasets.chen_clusters`; the losses, optimisers and training
loops are in :mod:`moekit.repro.experiments.chen2022` and :mod:`moekit.repro.experiments.train`.

Legend: R runs (seeds), N examples, P patches, D patch dim, K clusters, M experts,
F filters of one expert (= 2J: J per class), J filters per class, C = 2 classes,
G filters of all runs (R·F) or (run, expert) groups, Q patch rows (examples·P), X = P·D flat input, S steps.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor, nn

from moekit.dispatch import Assignments, LocalDispatcher, TokenDispatcher
from moekit.experts import ExpertBank, grouped_mm
from moekit.types import MoEOutput

ACTIVATIONS = ("cubic", "linear")
GATES = ("logit", "softmax")


# ----------------------------------------------------------------------------------------------
# experts
# ----------------------------------------------------------------------------------------------
def _check_activation(activation: str) -> str:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return activation


def conv_init(shape_FD: Sequence[int], generator: torch.Generator | None = None,
              scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """PyTorch's default Conv1d(1, F, D) init for weights (…, F, D) and biases (…, F): both
    U(−1/√D, 1/√D) (kaiming_uniform with a=√5 gives bound √(1/fan_in), fan_in = D), times ``scale``."""
    *lead, F_, D = shape_FD
    bound = 1.0 / math.sqrt(D)
    w = (torch.rand(*lead, F_, D, generator=generator) * 2 - 1) * bound * scale
    b = (torch.rand(*lead, F_, generator=generator) * 2 - 1) * bound * scale
    return w, b


def patch_expert_logits(x_NPD: Tensor, w_FD: Tensor, b_F: Tensor, activation: str) -> Tensor:
    """One patch-wise expert (the official Conv1d(1, 2J, D, stride D) network) → class logits (N, 2).

        h_j(x) = Σ_p σ(⟨w_j, x^(p)⟩ + b_j),   f(x) = [Σ_{j≤J} h_j(x), Σ_{j>J} h_j(x)],   σ(z) = z³ or z.

    For σ = identity the patch sum moves inside: f_c = ⟨Σ_{j∈c} w_j, Σ_p x^(p)⟩ + P Σ_{j∈c} b_j (exact).
    """
    N, P, D = x_NPD.shape
    F_ = w_FD.shape[0]
    if activation == "linear":
        s_ND = x_NPD.sum(1)
        wc_CD = w_FD.view(2, F_ // 2, D).sum(1)
        bc_C = b_F.view(2, F_ // 2).sum(1)
        return s_ND @ wc_CD.t() + P * bc_C
    h_NPF = x_NPD @ w_FD.t() + b_F
    return h_NPF.pow(3).sum(1).view(N, 2, F_ // 2).sum(-1)


class _CubicPatchLogits(torch.autograd.Function):
    """out[n, r, c] = Σ_p Σ_{j∈c} (⟨w_{r,j}, x_{n,p}⟩ + b_{r,j})³ for all runs at once.

    Computed in chunks of examples so that the (chunk·P, R·F) pre-activations stay in cache, and
    *recomputed* in backward instead of saved (the full (N·P, R·F) tensor is ~200 MB for the paper's
    sizes and streaming it through memory several times costs more than one extra small GEMM).
    Backward: ∂out_c/∂h_j = 3h_j² for j ∈ c, so ∂L/∂w_{r,j} = Σ_{n,p} 3h² g_{n,r,c(j)} x_{n,p}.
    """

    @staticmethod
    def forward(ctx, x_NPD: Tensor, w_RFD: Tensor, b_RF: Tensor, chunk: int) -> Tensor:  # type: ignore[override]
        N, P, D = x_NPD.shape
        R, F_, _ = w_RFD.shape
        w_GD, b_G = w_RFD.reshape(R * F_, D), b_RF.reshape(R * F_)  # G = R·F filters of all runs
        out_NRC = x_NPD.new_empty(N, R, 2)
        for s in range(0, N, chunk):
            x_QD = x_NPD[s:s + chunk].reshape(-1, D)                 # Q = chunk·P patch rows
            h_QG = torch.addmm(b_G, x_QD, w_GD.t())
            out_NRC[s:s + chunk] = h_QG.pow_(3).view(-1, P, R, 2, F_ // 2).sum((1, 4))
        ctx.save_for_backward(x_NPD, w_RFD, b_RF)
        ctx.chunk = chunk
        return out_NRC

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_NRC: Tensor):  # type: ignore[override]
        x_NPD, w_RFD, b_RF = ctx.saved_tensors
        N, P, D = x_NPD.shape
        R, F_, _ = w_RFD.shape
        w_GD, b_G = w_RFD.reshape(R * F_, D), b_RF.reshape(R * F_)
        gw_GD, gb_G = torch.zeros_like(w_GD), torch.zeros_like(b_G)
        gx_NPD = torch.empty_like(x_NPD) if ctx.needs_input_grad[0] else None
        g_NRC = g_NRC.contiguous()
        for s in range(0, N, ctx.chunk):
            x_QD = x_NPD[s:s + ctx.chunk].reshape(-1, D)
            n = x_QD.shape[0] // P
            h_QG = torch.addmm(b_G, x_QD, w_GD.t())
            # 3h² times the upstream gradient of the filter's class, broadcast over patches and filters
            gh_QG = h_QG.square_().mul_(3).view(n, P, R, 2, F_ // 2).mul_(g_NRC[s:s + n, None, :, :, None])
            gh_QG = gh_QG.view(n * P, R * F_)
            gw_GD.addmm_(gh_QG.t(), x_QD)
            gb_G += gh_QG.sum(0)
            if gx_NPD is not None:
                gx_NPD[s:s + n] = (gh_QG @ w_GD).view(n, P, D)
        return gx_NPD, gw_GD.view(R, F_, D), gb_G.view(R, F_), None


def cubic_patch_logits(x_NPD: Tensor, w_RFD: Tensor, b_RF: Tensor, chunk: int = 128) -> Tensor:
    """Class logits (R, N, 2) of R cubic patch experts on shared data: see :class:`_CubicPatchLogits`."""
    if chunk < 1:
        raise ValueError(f"chunk: expected >= 1, got {chunk}")
    return _CubicPatchLogits.apply(x_NPD, w_RFD, b_RF, chunk).permute(1, 0, 2)


class ChenSingle(nn.Module):
    """R independent single-model baselines: one patch-wise expert with ``filters_per_class`` filters
    per class (40 in the paper, 80 in total), default Conv1d init (× ``init_scale``).

    ``forward(x_NPD) -> logits_RNC``; the loss is plain cross-entropy on these logits.
    """

    def __init__(self, runs: int, dim: int = 50, filters_per_class: int = 40, activation: str = "cubic",
                 init_scale: float = 1.0, generators: Sequence[torch.Generator] | None = None):
        super().__init__()
        if runs < 1:
            raise ValueError(f"runs: expected >= 1, got {runs}")
        if filters_per_class < 1:
            raise ValueError(f"filters_per_class: expected >= 1, got {filters_per_class}")
        self.activation = _check_activation(activation)
        self.runs, self.dim, self.filters_per_class = runs, dim, filters_per_class
        gens = _generators(generators, runs)
        ws, bs = zip(*(conv_init((2 * filters_per_class, dim), g, init_scale) for g in gens))
        self.w_RFD = nn.Parameter(torch.stack(ws))
        self.b_RF = nn.Parameter(torch.stack(bs))

    def forward(self, x_NPD: Tensor) -> Tensor:
        _check_x(x_NPD, self.dim)
        N, P, D = x_NPD.shape
        R, F_ = self.w_RFD.shape[:2]
        J = F_ // 2
        if self.activation == "linear":
            s_ND = x_NPD.sum(1)
            wc_RCD = self.w_RFD.view(R, 2, J, D).sum(2)
            bc_RC = self.b_RF.view(R, 2, J).sum(2)
            return torch.einsum("nd,rcd->rnc", s_ND, wc_RCD) + P * bc_RC[:, None, :]
        # the data are shared across runs: one chunked GEMM against all R·F filters
        return cubic_patch_logits(x_NPD, self.w_RFD, self.b_RF)


class ChenMoE(nn.Module):
    """R independent noisy top-1 MoEs of M patch-wise experts (Chen et al. 2022, official code).

    Router (linear in the sum of patches, no bias, zero-initialised), per run r:

        h_m(x) = ⟨θ_m, Σ_p x^(p)⟩,   m(x) = argmax_m (h_m(x) + r_m),   r_m ~ U[0, 1) fresh at every forward,
        F(x) = π(x) · f_{m(x)}(x),

    with the gate π(x) = h_{m(x)}(x) + r_{m(x)}, the chosen *noisy logit* itself (``gate="logit"``:
    what the official code multiplies by — ``top1(router(x))`` on the noisy logits, no softmax), or
    π(x) = softmax(h + r)_{m(x)} (``gate="softmax"``: the paper's π_m). Experts as
    :func:`patch_expert_logits`, weights and biases at the default Conv1d init × ``expert_init_scale``
    (0.001). The official loss is cross-entropy applied to softmax(F(x)) (see :func:`moe_loss_R`).

    ``forward(x_NPD, noise_RNM=None, generators=None) -> MoEOutput(y=F_RNC, aux_loss=0, metrics)``,
    metrics: ``expert_ids`` (R, N), ``tokens_per_expert`` (R, M), ``gate`` (R, N). Noise comes from
    ``noise_RNM`` if given, else one (N, M) uniform draw per run from ``generators[r]``.
    """

    def __init__(self, runs: int, dim: int = 50, num_experts: int = 8, filters_per_class: int = 8,
                 activation: str = "cubic", expert_init_scale: float = 1e-3, gate: str = "logit",
                 generators: Sequence[torch.Generator] | None = None):
        super().__init__()
        if runs < 1:
            raise ValueError(f"runs: expected >= 1, got {runs}")
        if num_experts < 1:
            raise ValueError(f"num_experts: expected >= 1, got {num_experts}")
        if filters_per_class < 1:
            raise ValueError(f"filters_per_class: expected >= 1, got {filters_per_class}")
        if gate not in GATES:
            raise ValueError(f"gate: expected one of {GATES}, got {gate!r}")
        self.activation = _check_activation(activation)
        self.gate = gate
        self.runs, self.dim, self.num_experts, self.filters_per_class = runs, dim, num_experts, filters_per_class
        gens = _generators(generators, runs)
        ws, bs = zip(*(conv_init((num_experts, 2 * filters_per_class, dim), g, expert_init_scale) for g in gens))
        self.expert_w_RMFD = nn.Parameter(torch.stack(ws))
        self.expert_b_RMF = nn.Parameter(torch.stack(bs))
        self.router_w_RMD = nn.Parameter(torch.zeros(runs, num_experts, dim))

    def expert_parameters(self) -> list[nn.Parameter]:
        return [self.expert_w_RMFD, self.expert_b_RMF]

    def router_parameters(self) -> list[nn.Parameter]:
        return [self.router_w_RMD]

    def route(self, x_NPD: Tensor, noise_RNM: Tensor | None = None,
              generators: Sequence[torch.Generator] | None = None) -> tuple[Tensor, Tensor]:
        """``(gate_RN, expert_ids_RN)`` for one noisy top-1 routing pass."""
        _check_x(x_NPD, self.dim)
        N = x_NPD.shape[0]
        R, M = self.runs, self.num_experts
        logits_RNM = torch.einsum("nd,rmd->rnm", x_NPD.sum(1), self.router_w_RMD)
        if noise_RNM is None:
            gens = _generators(generators, R)
            noise_RNM = torch.stack([torch.rand(N, M, generator=g) for g in gens])
        elif noise_RNM.shape != (R, N, M):
            raise ValueError(f"noise_RNM: expected shape {(R, N, M)}, got {tuple(noise_RNM.shape)}")
        noisy_RNM = logits_RNM + noise_RNM
        top_RN, ids_RN = noisy_RNM.max(dim=-1)
        if self.gate == "softmax":
            top_RN = torch.softmax(noisy_RNM, dim=-1).gather(-1, ids_RN[..., None]).squeeze(-1)
        return top_RN, ids_RN

    def forward(self, x_NPD: Tensor, noise_RNM: Tensor | None = None,
                generators: Sequence[torch.Generator] | None = None) -> MoEOutput:
        gate_RN, ids_RN = self.route(x_NPD, noise_RNM, generators)
        y_RNC = self.dispatch_experts(x_NPD, ids_RN, gate_RN)           # dispatch → experts → combine
        tokens_RM = torch.zeros(self.runs, self.num_experts, dtype=torch.long, device=ids_RN.device).scatter_add_(
            1, ids_RN, torch.ones_like(ids_RN))
        metrics = {"expert_ids": ids_RN.detach(), "tokens_per_expert": tokens_RM, "gate": gate_RN.detach()}
        return MoEOutput(y_RNC, torch.zeros((), device=y_RNC.device), metrics)

    def expert_bank(self) -> "PatchExperts":
        """The R·M experts as one core expert bank (a view of the parameters, no copy)."""
        R, M, F_, D = self.expert_w_RMFD.shape
        return PatchExperts(self.expert_w_RMFD.view(R * M, F_, D), self.expert_b_RMF.view(R * M, F_),
                            self.activation)

    def dispatch_experts(self, x_NPD: Tensor, ids_RN: Tensor, weight_RN: Tensor,
                         dispatcher: TokenDispatcher | None = None) -> Tensor:
        """``weight · f_{m(x)}(x)`` for every (run, example) through the core token dispatcher: the R·N
        (run, example) tokens go to expert group g = r·M + m; each group runs once on its rows."""
        N, P, D = x_NPD.shape
        R, M = self.runs, self.num_experts
        x_TX = x_NPD.reshape(1, N, P * D).expand(R, N, P * D).reshape(R * N, P * D)   # T = R·N tokens
        expert_T = (ids_RN + M * torch.arange(R, device=ids_RN.device)[:, None]).reshape(-1)
        a = Assignments(torch.arange(R * N, device=ids_RN.device), expert_T, weight_RN.reshape(-1), R * N, R * M)
        disp = LocalDispatcher() if dispatcher is None else dispatcher
        rows, counts, state = disp.dispatch(x_TX, a)
        out = disp.compute(self.expert_bank(), rows, counts, state)
        return disp.combine(out, state).view(R, N, 2)

    def routed_expert_logits(self, x_NPD: Tensor, ids_RN: Tensor) -> Tensor:
        """f_{m(x)}(x) for every (run, example): each example goes only through its chosen expert."""
        return self.dispatch_experts(x_NPD, ids_RN, torch.ones(ids_RN.shape, dtype=x_NPD.dtype,
                                                                device=x_NPD.device))


class PatchExperts(ExpertBank):
    """G patch-wise experts (the official Conv1d(1, 2J, D, stride D) networks) as a core expert bank.

    A token is an example's P patches flattened to X = P·D. Expert g:
    ``f_g(x)_c = Σ_p Σ_{j∈c} σ(⟨w_{g,j}, x^(p)⟩ + b_{g,j})`` (σ = z³ or identity). ``forward`` runs each
    expert on its rows with one grouped matmul over the patch rows (every token contributes P rows to
    its expert's group); ``forward_dense`` is every expert on every token (the reference).
    """

    def __init__(self, w_GFD: Tensor, b_GF: Tensor, activation: str):
        super().__init__()
        self.w_GFD, self.b_GF, self.activation = w_GFD, b_GF, _check_activation(activation)
        self.num_experts, F_, self.patch_dim = w_GFD.shape
        self.filters = F_

    def _finish(self, h: Tensor) -> Tensor:
        return h.pow(3) if self.activation == "cubic" else h

    def forward(self, x_AX: Tensor, counts_G: Tensor) -> Tensor:
        A, D, F_ = x_AX.shape[0], self.patch_dim, self.filters
        P = x_AX.shape[1] // D
        x_QD = x_AX.reshape(A * P, D)                                    # Q = A·P patch rows, same order
        h_QF = grouped_mm(x_QD, self.w_GFD.transpose(1, 2), counts_G * P)
        group_Q = torch.bucketize(torch.arange(A * P, device=x_AX.device), torch.cumsum(counts_G * P, 0),
                                  right=True)
        b_G1F = torch.cat([self.b_GF, self.b_GF.new_zeros(1, F_)])      # padding rows: no expert, no bias
        h_QF = self._finish(h_QF + b_G1F.index_select(0, group_Q))
        return h_QF.view(A, P, 2, F_ // 2).sum((1, 3))                   # (A, 2) class logits

    def forward_dense(self, x_TX: Tensor) -> Tensor:
        T, D = x_TX.shape[0], self.patch_dim
        x_TPD = x_TX.view(T, -1, D)
        h_GTPF = torch.einsum("tpd,gfd->gtpf", x_TPD, self.w_GFD) + self.b_GF[:, None, None, :]
        G, _, P, F_ = h_GTPF.shape
        return self._finish(h_GTPF).view(G, T, P, 2, F_ // 2).sum((2, 4))


def _check_x(x_NPD: Tensor, dim: int) -> None:
    if not isinstance(x_NPD, Tensor) or x_NPD.dim() != 3 or x_NPD.shape[-1] != dim:
        shape = tuple(x_NPD.shape) if isinstance(x_NPD, Tensor) else type(x_NPD).__name__
        raise ValueError(f"x_NPD: expected a (N, P, {dim}) tensor, got {shape}")


def _generators(generators: Sequence[torch.Generator] | None, runs: int) -> list[torch.Generator | None]:
    if generators is None:
        return [None] * runs
    if len(generators) != runs:
        raise ValueError(f"generators: expected {runs} generators (one per run), got {len(generators)}")
    return list(generators)
