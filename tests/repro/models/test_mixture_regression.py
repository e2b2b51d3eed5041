"""EM for a mixture of linear regressions (PRML §14.5.1): a hand-worked step, monotone log-likelihood,
recovery of known lines, K=1 = least squares, option errors.

Legend: N examples, P basis functions, K components.
"""
import math

import pytest
import torch

from moekit.repro.models.mixture_regression import MixtureOfLinearRegressions


def test_one_em_step_by_hand():
    # φ = [1] (a bias only), t = (0, 1); start: means 0 and 1, σ² = 1, π = (½, ½)
    phi = torch.ones(2, 1, dtype=torch.float64)
    t = torch.tensor([0.0, 1.0], dtype=torch.float64)
    m = MixtureOfLinearRegressions(torch.tensor([[0.0], [1.0]], dtype=torch.float64),
                                   torch.full((2,), math.log(0.5), dtype=torch.float64),
                                   torch.ones(2, dtype=torch.float64))
    # E step: γ_n1 = exp(−t²/2) / (exp(−t²/2) + exp(−(t−1)²/2)) = 1/(1+e^{−½}) = 0.62246 at t=0, 0.37754 at t=1
    g = 1 / (1 + math.exp(-0.5))
    torch.testing.assert_close(m.responsibilities(phi, t), torch.tensor([[g, 1 - g], [1 - g, g]], dtype=torch.float64))
    # log p(t=0) = log(½ N(0|0,1) + ½ N(0|1,1)) = −½ log 2π + log(½(1 + e^{−½}))
    lp0 = -0.5 * math.log(2 * math.pi) + math.log(0.5 * (1 + math.exp(-0.5)))
    assert float(m.log_prob(phi, t)[0]) == pytest.approx(lp0, rel=1e-12)
    # M step: π = (½, ½); w_1 = Σγ_n1 t_n / Σγ_n1 = (1−g)/1; w_2 = g;
    # σ² = ½ Σ_n Σ_k γ_nk (t_n − w_k)² = g(1−g)²+(1−g)g² at each point → g(1−g)
    m2 = m.em_step(phi, t)
    torch.testing.assert_close(m2.log_mix_K.exp(), torch.tensor([0.5, 0.5], dtype=torch.float64))
    torch.testing.assert_close(m2.weights_KP[:, 0], torch.tensor([1 - g, g], dtype=torch.float64))
    torch.testing.assert_close(m2.var_K, torch.full((2,), g * (1 - g), dtype=torch.float64))
    assert g * (1 - g) == pytest.approx(0.23500, abs=1e-5)
    assert float(m2.log_prob(phi, t).sum()) > float(m.log_prob(phi, t).sum())


def _two_lines(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1
    which = torch.rand(n, generator=g) < 0.3
    t = torch.where(which, 2 * x + 1, -x) + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
    return torch.stack([torch.ones_like(x), x], -1), t


@pytest.mark.parametrize("variance", ["shared", "per_component"])
def test_log_likelihood_never_decreases(variance):
    phi, t = _two_lines()
    for seed in range(5):
        m = MixtureOfLinearRegressions.fit(phi, t, 3, variance=variance, max_iter=200, tol=0.0,
                                           generator=torch.Generator().manual_seed(seed))
        tr = torch.tensor(m.log_likelihood_trace, dtype=torch.float64)
        assert len(tr) > 50  # tol=0: runs until a step gains nothing (at most 200 steps)
        steps = tr[1:] - tr[:-1]
        assert float(steps.min()) >= -1e-9 * float(tr.abs().max()), (seed, float(steps.min()))
        assert float(tr[-1]) > float(tr[0])


def test_recovers_known_lines():
    phi, t = _two_lines(n=1000)
    m = MixtureOfLinearRegressions.fit(phi, t, 2, restarts=5, generator=torch.Generator().manual_seed(0))
    order = m.log_mix_K.argsort()  # the 30 % component first
    torch.testing.assert_close(m.log_mix_K.exp()[order], torch.tensor([0.3, 0.7], dtype=torch.float64), atol=0.04, rtol=0)
    torch.testing.assert_close(m.weights_KP[order], torch.tensor([[1.0, 2.0], [0.0, -1.0]], dtype=torch.float64),
                               atol=0.02, rtol=0)
    assert float(m.var_K[0].sqrt()) == pytest.approx(0.05, rel=0.1)


def test_one_component_is_least_squares():
    phi, t = _two_lines()
    m = MixtureOfLinearRegressions.fit(phi, t, 1, generator=torch.Generator().manual_seed(0))
    w = torch.linalg.lstsq(phi, t[:, None]).solution[:, 0]
    torch.testing.assert_close(m.weights_KP[0], w)
    assert float(m.var_K[0]) == pytest.approx(float((t - phi @ w).pow(2).mean()), rel=1e-10)
    torch.testing.assert_close(m.mean(phi), phi @ w)


def test_option_errors():
    phi, t = _two_lines(n=10)
    with pytest.raises(ValueError, match="variance"):
        MixtureOfLinearRegressions.fit(phi, t, 2, variance="diagonal")
    with pytest.raises(ValueError, match="num_components"):
        MixtureOfLinearRegressions.fit(phi, t, 0)
    with pytest.raises(ValueError, match="t_N"):
        MixtureOfLinearRegressions.fit(phi, t[:5], 2)
    with pytest.raises(ValueError, match="phi_NP"):
        MixtureOfLinearRegressions.fit(t, t, 2)
