"""Chen, Deng, Wu, Gu & Li 2022, "Towards Understanding Mixture of Experts in Deep Learning".

The synthetic cluster task, the patch-wise CNN experts, the noisy top-1 MoE and the single-model
baselines, all vectorised over R independent runs (seeds) so that ten seeds train in one pass.
Everything follows the official code (REFERENCE.md §7); choices the paper leaves open are noted
where they are made.

Legend: R runs (seeds), N examples, P patches, D patch dim, K clusters, M experts,
F filters of one expert (= 2J: J per class), J filters per class, C = 2 classes,
G filters of all runs (R·F) or (run, expert) groups, Q patch rows (examples·P), X = P·D flat input, S steps.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch
from torch import Tensor, nn

from ..types import MoEOutput

ACTIVATIONS = ("cubic", "linear")
GATES = ("logit", "softmax")
# Cross-entropy of softmax-probabilities (the official MoE loss) is bounded below by
# -log(e / (e + 1)) = log(1 + 1/e) ≈ 0.31326; the official code stops once it is within 0.0007.
MOE_LOSS_FLOOR = 0.314


# ----------------------------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------------------------
@dataclass
class ChenData:
    """One split of the synthetic task. ``x_NPD`` is already multiplied by ``scale``."""
    x_NPD: Tensor            # (N, P, D) float32, patches in a random order per example
    y_N: Tensor              # (N,) long in {0, 1}  (paper label -1 -> 0, +1 -> 1)
    cluster_N: Tensor        # (N,) long in [0, K): cluster k of each example
    noise_cluster_N: Tensor  # (N,) long in [0, K) \ {k}: the cluster k' whose feature is the noise
    features_KD: Tensor      # (K, D) unit feature vectors v_k (unscaled)
    centres_KD: Tensor       # (K, D) unit cluster centres c_k (unscaled), orthogonal to every v
    scale: float

    @property
    def x(self) -> Tensor:
        """The flat input (N, P·D), as the official code's Conv1d sees it."""
        return self.x_NPD.reshape(self.x_NPD.shape[0], -1)

    @property
    def vectors(self) -> tuple[Tensor, Tensor]:
        """``(features_KD, centres_KD)``; pass as ``features=`` to build a split on the same vectors."""
        return self.features_KD, self.centres_KD

    def __len__(self) -> int:
        return self.x_NPD.shape[0]


def orthonormal_vectors(count: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """``count`` orthonormal rows in R^dim: QR (= Gram–Schmidt) of a Gaussian (dim, count) draw."""
    if count > dim:
        raise ValueError(f"count: need count <= dim for orthonormal vectors, got count={count}, dim={dim}")
    g_DC = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    q_DC, r_CC = torch.linalg.qr(g_DC)
    # fix the sign so the result is the Gram–Schmidt basis (positive diagonal of R)
    q_DC = q_DC * torch.sign(torch.diagonal(r_CC))[None, :]
    return q_DC.t().contiguous().float()


def make_chen_data(n: int, *, num_clusters: int = 4, num_patches: int = 4, dim: int = 50,
                   sigma_p: float = 1.0, gamma_max: float = 3.0, scale: float = 10.0,
                   generator: torch.Generator | None = None,
                   features: tuple[Tensor, Tensor] | None = None) -> ChenData:
    """Draw ``n`` examples of the Chen et al. (2022) mixture-of-clusters task.

    Feature vectors v_1..v_K and centres c_1..c_K are 2K orthonormal vectors in R^d (drawn here unless
    ``features=(v_KD, c_KD)`` is given — train and test must share them). Each example draws
    k ~ U[K], k' ~ U([K] \\ {k}), y ~ U{±1}, ε ~ U{±1}, α ~ U(0.5, 2), β ~ U(1, 2), γ ~ U(0.5, γ_max)
    and has the patches, in a random order,

        x = scale · permute( y α v_k,  β c_k,  ε γ v_k',  ξ_1, …, ξ_{P−3} ),   ξ ~ N(0, σ_p²/d · I_d).

    Labels are returned as y ∈ {0, 1} (−1 → 0).
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n: expected a positive int, got {n!r}")
    if num_clusters < 2:
        raise ValueError(f"num_clusters: expected >= 2 (k' must differ from k), got {num_clusters}")
    if num_patches < 3:
        raise ValueError(f"num_patches: expected >= 3 (signal, centre, feature-noise patches), got {num_patches}")
    if 2 * num_clusters > dim:
        raise ValueError(f"dim: need 2*num_clusters <= dim for orthonormal features and centres, "
                         f"got dim={dim}, num_clusters={num_clusters}")
    if not sigma_p >= 0:
        raise ValueError(f"sigma_p: expected >= 0, got {sigma_p}")
    if not gamma_max >= 0.5:
        raise ValueError(f"gamma_max: expected >= 0.5 (γ ~ U(0.5, gamma_max)), got {gamma_max}")
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale}")
    K, P, D = num_clusters, num_patches, dim
    if features is None:
        basis_2KD = orthonormal_vectors(2 * K, D, generator)
        v_KD, c_KD = basis_2KD[:K], basis_2KD[K:]
    else:
        if not (isinstance(features, (tuple, list)) and len(features) == 2):
            raise TypeError("features: expected a pair (features_KD, centres_KD), e.g. ChenData.vectors")
        v_KD, c_KD = (torch.as_tensor(t, dtype=torch.float32) for t in features)
        if v_KD.shape != (K, D) or c_KD.shape != (K, D):
            raise ValueError(f"features: expected two ({K}, {D}) tensors, got {tuple(v_KD.shape)}, "
                             f"{tuple(c_KD.shape)}")

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    k_N = torch.randint(0, K, (n,), generator=generator)
    # k' uniform on the other K-1 clusters: shift k by 1..K-1 (mod K)
    k_noise_N = (k_N + torch.randint(1, K, (n,), generator=generator)) % K
    y_N = torch.randint(0, 2, (n,), generator=generator)
    eps_N = 2.0 * torch.randint(0, 2, (n,), generator=generator).float() - 1.0
    alpha_N, beta_N, gamma_N = uniform(0.5, 2.0), uniform(1.0, 2.0), uniform(0.5, gamma_max)
    sign_N = 2.0 * y_N.float() - 1.0

    signal_ND = (sign_N * alpha_N)[:, None] * v_KD[k_N]        # y α v_k
    centre_ND = beta_N[:, None] * c_KD[k_N]                     # β c_k
    fnoise_ND = (eps_N * gamma_N)[:, None] * v_KD[k_noise_N]    # ε γ v_k'
    xi_NQD = torch.randn(n, P - 3, D, generator=generator) * (sigma_p / math.sqrt(D))  # Q = P−3 noise patches
    patches_NPD = torch.cat([signal_ND[:, None], centre_ND[:, None], fnoise_ND[:, None], xi_NQD], dim=1)
    # a random patch order per example: argsort of i.i.d. uniforms is a uniform permutation
    perm_NP = torch.argsort(torch.rand(n, P, generator=generator), dim=1)
    x_NPD = torch.gather(patches_NPD, 1, perm_NP[:, :, None].expand(n, P, D)) * scale
    return ChenData(x_NPD=x_NPD.contiguous(), y_N=y_N, cluster_N=k_N, noise_cluster_N=k_noise_N,
                    features_KD=v_KD, centres_KD=c_KD, scale=float(scale))


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
        f_RNC = self.routed_expert_logits(x_NPD, ids_RN)
        y_RNC = gate_RN[..., None] * f_RNC
        tokens_RM = torch.stack([torch.bincount(ids_RN[r], minlength=self.num_experts) for r in range(self.runs)])
        metrics = {"expert_ids": ids_RN.detach(), "tokens_per_expert": tokens_RM, "gate": gate_RN.detach()}
        return MoEOutput(y_RNC, torch.zeros((), device=y_RNC.device), metrics)

    def routed_expert_logits(self, x_NPD: Tensor, ids_RN: Tensor) -> Tensor:
        """f_{m(x)}(x) for every (run, example): each example goes only through its chosen expert.

        The (run, example) rows are sorted by group g = r·M + m and each group is one small matmul,
        so the work is R·N·P·F·D rather than M times that.
        """
        N, P, D = x_NPD.shape
        R, M = self.runs, self.num_experts
        if self.activation == "linear":
            # linear experts are cheap to evaluate everywhere:
            # f_m(x)_c = ⟨Σ_{j∈c} w_{m,j}, Σ_p x^(p)⟩ + P Σ_{j∈c} b_{m,j}
            J = self.filters_per_class
            wc_RMCD = self.expert_w_RMFD.view(R, M, 2, J, D).sum(3)
            bc_RMC = self.expert_b_RMF.view(R, M, 2, J).sum(3)
            all_RNMC = torch.einsum("nd,rmcd->rnmc", x_NPD.sum(1), wc_RMCD) + P * bc_RMC[:, None]
            return all_RNMC.gather(2, ids_RN[:, :, None, None].expand(R, N, 1, 2)).squeeze(2)
        group_G = (ids_RN + M * torch.arange(R, device=ids_RN.device)[:, None]).reshape(-1)  # G = R·N rows
        order_G = torch.argsort(group_G, stable=True)
        counts = torch.bincount(group_G, minlength=R * M).tolist()
        example_G = order_G % N
        x_NX = x_NPD.reshape(N, P * D)  # 2-D row gather (index_select) is several times faster than x[rows]
        pieces, start = [], 0
        for g, c in enumerate(counts):
            if c == 0:
                continue
            r, m = divmod(g, M)
            x_nPD = x_NX.index_select(0, example_G[start:start + c]).view(c, P, D)
            pieces.append(patch_expert_logits(x_nPD, self.expert_w_RMFD[r, m], self.expert_b_RMF[r, m],
                                              self.activation))
            start += c
        sorted_GC = torch.cat(pieces)
        inverse_G = torch.empty_like(order_G)
        inverse_G[order_G] = torch.arange(order_G.numel(), device=order_G.device)
        return sorted_GC[inverse_G].view(R, N, 2)


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


# ----------------------------------------------------------------------------------------------
# losses and accuracy (per run)
# ----------------------------------------------------------------------------------------------
def single_loss_R(logits_RNC: Tensor, y_N: Tensor) -> Tensor:
    """Per-run mean cross-entropy of the single model's logits: ℓ_r = mean_n −log softmax(z_rn)_{y_n}."""
    logp_RNC = torch.log_softmax(logits_RNC, dim=-1)
    return -logp_RNC.gather(-1, y_N.expand(logits_RNC.shape[0], -1)[..., None]).squeeze(-1).mean(-1)


def moe_loss_R(out_RNC: Tensor, y_N: Tensor) -> Tensor:
    """The official MoE loss: ``CrossEntropyLoss(softmax(F(x)), y)``, i.e. ℓ = −log softmax(softmax(F))_y.

    (The MoE's forward ends in a softmax and ``nn.CrossEntropyLoss`` softmaxes again.) Its minimum is
    log(1 + 1/e) ≈ 0.3133 at a confident correct prediction — hence :data:`MOE_LOSS_FLOOR`.
    """
    return single_loss_R(torch.softmax(out_RNC, dim=-1), y_N)


def accuracy_R(logits_RNC: Tensor, y_N: Tensor) -> Tensor:
    """Per-run accuracy in % (argmax over classes; softmax does not change it)."""
    return (logits_RNC.argmax(-1) == y_N).float().mean(-1) * 100.0


# ----------------------------------------------------------------------------------------------
# optimisers, per run
# ----------------------------------------------------------------------------------------------
@torch.no_grad()
def normalized_gd_step_(params: Sequence[Tensor], lr: float, active_R: Tensor | None = None,
                        group_dims: int = 2) -> None:
    """Normalised GD (official ``NormalizedGD``): for each expert e = (r, m) — the first ``group_dims``
    axes of every parameter — divide its gradient by the sum of its per-tensor gradient norms and
    take a plain step,

        g_e ← g_e / Σ_t ‖g_{e,t}‖₂   (skipped when that sum is 0),   θ_e ← θ_e − lr · g_e.

    Runs with ``active_R[r] == False`` are left unchanged.
    """
    grads = [p.grad for p in params]
    if any(g is None for g in grads):
        raise ValueError("params: every parameter needs a .grad before normalized_gd_step_")
    lead = params[0].shape[:group_dims]
    norm_E = sum(g.reshape(*lead, -1).norm(dim=-1) for g in grads)  # (R, M): Σ over tensors of ‖g‖
    # an expert that got no examples has g = 0 and is not moved (the official code skips the division)
    scale_E = torch.where(norm_E > 0, 1.0 / norm_E.clamp_min(1e-30), torch.zeros_like(norm_E))
    if active_R is not None:
        scale_E = scale_E * active_R.to(scale_E.dtype).view(-1, *([1] * (group_dims - 1)))
    for p, g in zip(params, grads):
        p.sub_(lr * g * scale_E.view(*lead, *([1] * (p.dim() - group_dims))))


@torch.no_grad()
def sgd_step_(params: Sequence[Tensor], lr: float, active_R: Tensor | None = None) -> None:
    """Plain SGD θ ← θ − lr · g on parameters with a leading run axis; inactive runs unchanged."""
    for p in params:
        if p.grad is None:
            continue
        g = p.grad if active_R is None else p.grad * _run_mask(active_R, p)
        p.sub_(lr * g)


def _run_mask(active_R: Tensor, p: Tensor) -> Tensor:
    return active_R.to(p.dtype).view(-1, *([1] * (p.dim() - 1)))


class RunAdam:
    """Adam with L2 weight decay folded into the gradient (``torch.optim.Adam(weight_decay=…)``, as in
    the official code), for parameters with a leading run axis; each run keeps its own step count so
    stopped runs can be frozen:

        g ← g + λθ,  m ← β₁m + (1−β₁)g,  v ← β₂v + (1−β₂)g²,  θ ← θ − lr · m̂ / (√v̂ + ε),
        m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ).
    """

    def __init__(self, params: Iterable[Tensor], lr: float, weight_decay: float = 0.0,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        if not self.params:
            raise ValueError("params: expected at least one parameter")
        if lr <= 0:
            raise ValueError(f"lr: expected > 0, got {lr}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay: expected >= 0, got {weight_decay}")
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        R = self.params[0].shape[0]
        self.step_R = torch.zeros(R, dtype=torch.float64)
        self.m = [torch.zeros_like(p) for p in self.params]
        self.v = [torch.zeros_like(p) for p in self.params]

    @torch.no_grad()
    def step(self, active_R: Tensor | None = None) -> None:
        R = self.step_R.shape[0]
        active_R = torch.ones(R, dtype=torch.bool) if active_R is None else active_R.bool()
        self.step_R += active_R.double()
        b1, b2 = self.betas
        bc1_R = (1 - b1 ** self.step_R.clamp_min(1)).float()
        bc2_R = (1 - b2 ** self.step_R.clamp_min(1)).float()
        for p, m, v in zip(self.params, self.m, self.v):
            if p.grad is None:
                continue
            shape = (-1, *([1] * (p.dim() - 1)))
            keep = active_R.view(shape)
            g = p.grad + self.weight_decay * p if self.weight_decay else p.grad
            m.copy_(torch.where(keep, b1 * m + (1 - b1) * g, m))
            v.copy_(torch.where(keep, b2 * v + (1 - b2) * g * g, v))
            denom = (v.sqrt() / bc2_R.sqrt().view(shape)) + self.eps
            update = (self.lr / bc1_R).view(shape) * m / denom
            p.sub_(torch.where(keep, update, torch.zeros_like(update)))


# ----------------------------------------------------------------------------------------------
# training loops
# ----------------------------------------------------------------------------------------------
@dataclass
class TrainLog:
    losses_RS: Tensor    # (R, S) training loss per step; after a run stops its last loss is carried forward
    stopped_R: Tensor    # (R,) long: number of optimiser steps each run took


class EarlyStop:
    """The official per-run stopping rule. At each step, before the update, with loss ℓ_t:
    if ℓ_t ≤ best: best ← ℓ_t (keep going); else stop when ℓ_t > best + ``tol`` (the loss has risen:
    it stopped improving), or ℓ_t ≤ ``floor`` (at the loss floor), but only after ``after`` steps.
    The MoE uses tol = 0.02, floor = 0.314, after = 0; the single models tol = 0.02, after = 500."""

    def __init__(self, runs: int, tol: float = 0.02, floor: float = -math.inf, after: int = 0):
        self.best_R = torch.full((runs,), math.inf)
        self.active_R = torch.ones(runs, dtype=torch.bool)
        self.tol, self.floor, self.after = tol, floor, after

    def update(self, step: int, loss_R: Tensor) -> Tensor:
        loss_R = loss_R.detach().float()
        improved = loss_R <= self.best_R
        stop = ~improved & ((loss_R > self.best_R + self.tol) | (loss_R <= self.floor)) & (step > self.after)
        self.best_R = torch.where(improved & self.active_R, loss_R, self.best_R)
        self.active_R = self.active_R & ~stop
        return self.active_R


def _train(loss_fn: Callable[[], Tensor], update_fn: Callable[[Tensor], None], params: Sequence[Tensor],
           runs: int, steps: int, stopper: EarlyStop | None,
           track: Callable[[Iterable[int], int, str], Iterable[int]] | None, description: str) -> TrainLog:
    """Full-batch loop shared by both models: loss (R,) → stopping rule → backward of Σ_r ℓ_r (each run's
    parameters only see their own loss) → per-run update of the still-active runs."""
    losses: list[Tensor] = []
    last_R = torch.full((runs,), math.nan)
    taken_R = torch.zeros(runs, dtype=torch.long)
    active_R = torch.ones(runs, dtype=torch.bool)
    it: Iterable[int] = range(steps) if track is None else track(range(steps), steps, description)
    for t in it:
        if not active_R.any():  # all runs stopped: keep the log rectangular, no more compute
            losses.append(last_R.clone())
            continue
        for p in params:
            p.grad = None
        loss_R = loss_fn()
        last_R = torch.where(active_R, loss_R.detach().float(), last_R)  # runs stopped earlier keep theirs
        losses.append(last_R.clone())
        if stopper is not None:
            active_R = stopper.update(t, loss_R)
            if not active_R.any():
                continue
        loss_R.sum().backward()
        update_fn(active_R)
        taken_R += active_R.long()
    return TrainLog(torch.stack(losses, dim=1), taken_R)


def train_moe(model: ChenMoE, data: ChenData, *, steps: int = 500, expert_lr: float = 1e-3,
              router_lr: float = 0.1, generators: Sequence[torch.Generator] | None = None,
              early_stop: bool = True, track=None, description: str = "MoE") -> TrainLog:
    """Official MoE training: full batch, experts by :func:`normalized_gd_step_` (lr 1e-3, per run and
    expert), router by SGD (lr 0.1), fresh routing noise every step from ``generators[r]``, loss
    :func:`moe_loss_R`, stopping rule :class:`EarlyStop` (tol 0.02, floor 0.314)."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    R = model.runs
    gens = _generators(generators, R)
    stopper = EarlyStop(R, tol=0.02, floor=MOE_LOSS_FLOOR) if early_stop else None

    def loss_fn() -> Tensor:
        return moe_loss_R(model(data.x_NPD, generators=gens).y, data.y_N)

    def update_fn(active_R: Tensor) -> None:
        normalized_gd_step_(model.expert_parameters(), expert_lr, active_R)
        sgd_step_(model.router_parameters(), router_lr, active_R)

    return _train(loss_fn, update_fn, list(model.parameters()), R, steps, stopper, track, description)


def train_single(model: ChenSingle, data: ChenData, *, steps: int = 800, lr: float | None = None,
                 weight_decay: float = 5e-4, early_stop: bool = True, track=None,
                 description: str = "single") -> TrainLog:
    """Official single-model training: full batch, Adam (lr 0.003 linear / 0.01 cubic unless given,
    L2 weight decay 5e-4), cross-entropy on the logits, stop after step 500 once the loss rises 0.02
    above its best."""
    if steps < 1:
        raise ValueError(f"steps: expected >= 1, got {steps}")
    if lr is None:
        lr = 0.01 if model.activation == "cubic" else 0.003
    R = model.runs
    opt = RunAdam(model.parameters(), lr=lr, weight_decay=weight_decay)
    stopper = EarlyStop(R, tol=0.02, after=500) if early_stop else None

    def loss_fn() -> Tensor:
        return single_loss_R(model(data.x_NPD), data.y_N)

    return _train(loss_fn, opt.step, list(model.parameters()), R, steps, stopper, track, description)
