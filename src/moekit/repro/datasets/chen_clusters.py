"""Chen, Deng, Wu, Gu & Li 2022's synthetic mixture-of-clusters task (the official code's generator).

K clusters, each with a feature vector v_k and a centre c_k (2K orthonormal vectors in R^d); an example
of cluster k has P patches: the signal y·α·v_k, the centre β·c_k, the feature noise ε·γ·v_k' of another
cluster and P−3 Gaussian noise patches, in a random order. A patch-additive single model cannot
separate signal from feature noise (the paper's Theorem 4.1 bounds its accuracy by 87.5 % when γ and α
have the same law); an MoE that routes each cluster to its own expert can.

Legend: T examples, L patches per example, D patch dim (see the package legend). K (clusters) and P
(patches) are the paper's symbols, kept in its formulas and in ``K, P, D = num_clusters, num_patches, dim``.
The public fields keep their historical suffixes: ``x_NPD`` is (T, L, D); ``y_N``, ``cluster_N`` and
``noise_cluster_N`` are (T,); ``features_KD`` and ``centres_KD`` hold one row per cluster.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class ChenData:
    """One split of the synthetic task. ``x_NPD`` is already multiplied by ``scale``."""
    x_NPD: Tensor            # (T, L, D) float32, patches in a random order per example
    y_N: Tensor              # (T,) long in {0, 1}  (paper label -1 -> 0, +1 -> 1)
    cluster_N: Tensor        # (T,) long in [0, K): cluster k of each example
    noise_cluster_N: Tensor  # (T,) long in [0, K) \ {k}: the cluster k' whose feature is the noise
    features_KD: Tensor      # (num_clusters, D) unit feature vectors v_k (unscaled)
    centres_KD: Tensor       # (num_clusters, D) unit cluster centres c_k (unscaled), orthogonal to every v
    scale: float

    @property
    def x(self) -> Tensor:
        """The flat input (T, L·D), as the official code's Conv1d sees it."""
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
    gauss = torch.randn(dim, count, generator=generator, dtype=torch.float64)
    q_mat, r_mat = torch.linalg.qr(gauss)
    # fix the sign so the result is the Gram–Schmidt basis (positive diagonal of R)
    q_mat = q_mat * torch.sign(torch.diagonal(r_mat))[None, :]
    return q_mat.t().contiguous().float()


def make_chen_data(n: int, *, num_clusters: int = 4, num_patches: int = 4, dim: int = 50,
                   sigma_p: float = 1.0, gamma_max: float = 3.0, scale: float = 10.0,
                   generator: torch.Generator | None = None,
                   features: tuple[Tensor, Tensor] | None = None) -> ChenData:
    """Draw ``n`` examples of the Chen et al. (2022) mixture-of-clusters task.

    Feature vectors v_1..v_K and centres c_1..c_K are 2K orthonormal vectors in R^d (drawn here unless
    ``features=(feature_vecs, centre_vecs)`` is given — train and test must share them). Each example draws
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
        basis_vecs = orthonormal_vectors(2 * K, D, generator)
        feature_vecs, centre_vecs = basis_vecs[:K], basis_vecs[K:]
    else:
        if not (isinstance(features, (tuple, list)) and len(features) == 2):
            raise TypeError("features: expected a pair (features_KD, centres_KD), e.g. ChenData.vectors")
        feature_vecs, centre_vecs = (torch.as_tensor(t, dtype=torch.float32) for t in features)
        if feature_vecs.shape != (K, D) or centre_vecs.shape != (K, D):
            raise ValueError(f"features: expected two ({K}, {D}) tensors, got {tuple(feature_vecs.shape)}, "
                             f"{tuple(centre_vecs.shape)}")

    def uniform(lo: float, hi: float) -> Tensor:
        return lo + (hi - lo) * torch.rand(n, generator=generator)

    k_T = torch.randint(0, K, (n,), generator=generator)
    # k' uniform on the other K-1 clusters: shift k by 1..K-1 (mod K)
    k_noise_T = (k_T + torch.randint(1, K, (n,), generator=generator)) % K
    y_T = torch.randint(0, 2, (n,), generator=generator)
    eps_T = 2.0 * torch.randint(0, 2, (n,), generator=generator).float() - 1.0
    alpha_T, beta_T, gamma_T = uniform(0.5, 2.0), uniform(1.0, 2.0), uniform(0.5, gamma_max)
    sign_T = 2.0 * y_T.float() - 1.0

    signal_TD = (sign_T * alpha_T)[:, None] * feature_vecs[k_T]        # y α v_k
    centre_TD = beta_T[:, None] * centre_vecs[k_T]                     # β c_k
    fnoise_TD = (eps_T * gamma_T)[:, None] * feature_vecs[k_noise_T]    # ε γ v_k'
    xi_noise = torch.randn(n, P - 3, D, generator=generator) * (sigma_p / math.sqrt(D))  # P−3 noise patches
    patches_TLD = torch.cat([signal_TD[:, None], centre_TD[:, None], fnoise_TD[:, None], xi_noise], dim=1)
    # a random patch order per example: argsort of i.i.d. uniforms is a uniform permutation
    perm_TL = torch.argsort(torch.rand(n, P, generator=generator), dim=1)
    x_TLD = torch.gather(patches_TLD, 1, perm_TL[:, :, None].expand(n, P, D)) * scale
    return ChenData(x_NPD=x_TLD.contiguous(), y_N=y_T, cluster_N=k_T, noise_cluster_N=k_noise_T,
                    features_KD=feature_vecs, centres_KD=centre_vecs, scale=float(scale))


__all__ = ["ChenData", "make_chen_data", "orthonormal_vectors"]
