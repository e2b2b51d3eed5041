"""Generated data: related tasks (Ma et al. 2018) and PRML's inverse sinusoid with its exact density.

Legend: N examples, D input dim, M tasks, G grid points.
"""
import math

import pytest
import torch

from moekit.repro.datasets.synthetic import (RelatedTasks, inverse_sinusoid, inverse_sinusoid_log_density,
                                       orthonormal_pair)


@pytest.mark.parametrize("p", [1.0, 0.9, 0.5, 0.0, -0.3])
def test_task_weights_have_the_asked_cosine(p):
    tasks = RelatedTasks.make(20, p, scale=3.0, generator=torch.Generator().manual_seed(1))
    w1, w2 = tasks.w_MD
    assert float(w1.norm()) == pytest.approx(3.0) and float(w2.norm()) == pytest.approx(3.0)
    assert float(w1 @ w2 / (w1.norm() * w2.norm())) == pytest.approx(p, abs=1e-12)


def test_orthonormal_pair():
    u1, u2 = orthonormal_pair(5, torch.Generator().manual_seed(0))
    assert float(u1 @ u2) == pytest.approx(0.0, abs=1e-12)
    assert float(u1.norm()) == pytest.approx(1.0) and float(u2.norm()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="dim"):
        orthonormal_pair(1)


def test_labels_follow_the_recipe():
    g = torch.Generator().manual_seed(0)
    tasks = RelatedTasks.make(8, 0.8, num_sines=3, noise_std=0.0, generator=g)
    x, y = tasks.sample(5, generator=g, dtype=torch.float64)
    for m in range(2):
        z = x @ tasks.w_MD[m]
        ref = z + sum(torch.sin(a * z + b) for a, b in zip(tasks.alpha_S, tasks.beta_S))
        torch.testing.assert_close(y[:, m], ref)
    # identical tasks at p = 1 (same weights, same sines): labels differ only by the noise
    tasks1 = RelatedTasks.make(8, 1.0, noise_std=0.1, generator=g)
    _, y1 = tasks1.sample(20_000, generator=g, dtype=torch.float64)
    assert float((y1[:, 0] - y1[:, 1]).std()) == pytest.approx(0.1 * math.sqrt(2), rel=0.03)


def test_label_correlation_falls_with_p():
    corr = []
    for p in (1.0, 0.9, 0.8, 0.5):
        g = torch.Generator().manual_seed(3)
        _, y = RelatedTasks.make(50, p, generator=g).sample(20_000, generator=g)
        corr.append(float(torch.corrcoef(y.T)[0, 1]))
    assert corr == sorted(corr, reverse=True) and corr[0] > 0.99 and corr[-1] < 0.8


def test_bad_task_options():
    with pytest.raises(ValueError, match="correlation"):
        RelatedTasks.make(5, 1.5)
    with pytest.raises(ValueError, match="scale"):
        RelatedTasks.make(5, 0.5, scale=0.0)
    with pytest.raises(ValueError, match="num_sines"):
        RelatedTasks.make(5, 0.5, num_sines=0)


def test_inverse_sinusoid_and_its_density():
    g = torch.Generator().manual_seed(0)
    x, t = inverse_sinusoid(2000, g, dtype=torch.float64)
    assert float(t.min()) >= 0 and float(t.max()) <= 1
    assert float((x - t - 0.3 * torch.sin(2 * math.pi * t)).abs().max()) <= 0.1
    # the density integrates to one over t for a few x, including the three-branch middle
    t_G = torch.linspace(0, 1, 20_001, dtype=torch.float64)
    for x0 in (0.1, 0.5, 0.8):
        lp = inverse_sinusoid_log_density(torch.full_like(t_G, x0), t_G)
        assert float(torch.trapezoid(lp.exp(), t_G)) == pytest.approx(1.0, abs=2e-3)
    # noise-free, x ∈ (0.41, 0.59) has three preimages; with the ±0.1 noise the support in t is two separate
    # pieces around x = 0.45 (a gap where the curve rises above x + 0.1) and one piece far from the fold
    def pieces(x0):
        inside = inverse_sinusoid_log_density(torch.full_like(t_G, x0), t_G).isfinite().to(torch.int8)
        return int(inside[0]) + int((inside[1:] - inside[:-1] == 1).sum())
    assert pieces(0.45) == 2 and pieces(0.55) == 2 and pieces(0.2) == 1 and pieces(0.9) == 1
    # off the support: −inf
    assert inverse_sinusoid_log_density(torch.tensor([0.5]), torch.tensor([0.9])).item() == -math.inf
    with pytest.raises(ValueError, match="noise"):
        inverse_sinusoid(5, noise=0.0)
