"""The Chen et al. 2022 cluster-task generator: the recipe patch by patch, noise variance, shared vectors.

Legend: N examples, P patches, D patch dim, K clusters, B basis vectors (2K).
"""
import pytest
import torch

from moekit.repro.datasets.chen_clusters import make_chen_data, orthonormal_vectors


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_data_patches_follow_the_recipe():
    # σ_p = 0 makes the noise patches exactly zero, so every other patch can be read off exactly
    K, P, D, n, scale = 3, 5, 12, 400, 10.0
    d = make_chen_data(n, num_clusters=K, num_patches=P, dim=D, sigma_p=0.0, gamma_max=3.0, scale=scale,
                       generator=gen(0))
    assert d.x_NPD.shape == (n, P, D) and d.x.shape == (n, P * D) and len(d) == n
    basis = torch.cat([d.features_KD, d.centres_KD])                      # (2K, D): v_1..v_K, c_1..c_K
    torch.testing.assert_close(basis @ basis.t(), torch.eye(2 * K), atol=1e-5, rtol=0)
    assert set(d.y_N.unique().tolist()) == {0, 1} and (d.noise_cluster_N != d.cluster_N).all()
    coef_NPB = torch.einsum("npd,bd->npb", d.x_NPD / scale, basis)        # coordinates of each patch
    torch.testing.assert_close(coef_NPB @ basis, d.x_NPD / scale, atol=1e-5, rtol=0)  # nothing else in x
    sign = 2.0 * d.y_N.float() - 1.0
    signal_pos = []
    for i in range(n):
        k, kn = d.cluster_N[i].item(), d.noise_cluster_N[i].item()
        nz = coef_NPB[i].abs() > 1e-5                                     # (P, 2K) non-zero coordinates
        assert nz.sum() == 3 and (nz.sum(1) <= 1).all()                   # three one-direction patches
        p_sig, p_cen, p_fn = (int(nz[:, j].nonzero()) for j in (k, K + k, kn))
        alpha = (coef_NPB[i, p_sig, k] * sign[i]).item()                 # y α v_k, α ∈ [0.5, 2]
        beta = coef_NPB[i, p_cen, K + k].item()                           # β c_k, β ∈ [1, 2]
        gamma = coef_NPB[i, p_fn, kn].abs().item()                        # ε γ v_k', γ ∈ [0.5, 3]
        assert 0.5 - 1e-5 <= alpha <= 2 + 1e-5 and 1 - 1e-5 <= beta <= 2 + 1e-5 and 0.5 - 1e-5 <= gamma <= 3 + 1e-5
        signal_pos.append(p_sig)
    assert set(signal_pos) == set(range(P))  # the patch order is shuffled per example


def test_noise_patch_variance_and_shared_vectors():
    D, sigma_p = 20, 2.0
    d = make_chen_data(3000, num_patches=3 + 2, dim=D, sigma_p=sigma_p, scale=1.0, generator=gen(1))
    basis = torch.cat([d.features_KD, d.centres_KD])
    # the squared norm of the part orthogonal to the 2K basis: noise patches contribute σ_p²/d per coordinate
    x = d.x_NPD.reshape(-1, D)
    resid = x - (x @ basis.t()) @ basis
    per_coord = resid.pow(2).sum() / (d.x_NPD.shape[0] * 2 * (D - basis.shape[0]))
    assert abs(per_coord.item() - sigma_p ** 2 / D) < 0.05 * sigma_p ** 2 / D
    test = make_chen_data(10, dim=D, num_patches=5, features=d.vectors, generator=gen(2))
    assert torch.equal(test.features_KD, d.features_KD) and torch.equal(test.centres_KD, d.centres_KD)
    again = make_chen_data(3000, num_patches=5, dim=D, sigma_p=sigma_p, scale=1.0, generator=gen(1))
    assert torch.equal(again.x_NPD, d.x_NPD)


def test_orthonormal_vectors_are_gram_schmidt():
    v = orthonormal_vectors(4, 9, gen(3))
    g = torch.randn(9, 4, generator=gen(3), dtype=torch.float64)
    # Gram–Schmidt by hand
    qs = []
    for j in range(4):
        u = g[:, j].clone()
        for q in qs:
            u -= (u @ q) * q
        qs.append(u / u.norm())
    torch.testing.assert_close(v, torch.stack(qs).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_patches=2), "num_patches"), (dict(num_clusters=1), "num_clusters"),
    (dict(dim=7, num_clusters=4), "dim"), (dict(sigma_p=-1.0), "sigma_p"),
    (dict(gamma_max=0.4), "gamma_max"), (dict(scale=0.0), "scale"),
    (dict(features=(torch.zeros(4, 50), torch.zeros(3, 50))), "features")])
def test_data_argument_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_chen_data(10, **kwargs)
    with pytest.raises(ValueError, match="n"):
        make_chen_data(0)
