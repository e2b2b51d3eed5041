"""Generated data sets: multi-task regressions of controlled relatedness and PRML's inverse sinusoid.

Legend: T examples, D input dim, F tasks (2) (see the package legend). The public names keep their
historical suffixes: the fields ``w_MD`` (F, D), ``alpha_S`` and ``beta_S`` (one value per sine term) and the
arguments ``x_ND`` (T, D), ``x_N`` and ``t_N`` (T,).

**Tasks of controlled relatedness** (Ma et al., KDD 2018, section "Synthetic Data Generation"): two
orthonormal vectors ``u1 ⟂ u2`` in R^D, a scale ``c`` and a correlation score ``p ∈ [−1, 1]`` give the
task weights ``w1 = c·u1`` and ``w2 = c·(p·u1 + √(1−p²)·u2)``, so ``cos(w1, w2) = p``. An input has i.i.d.
``N(0, 1)`` entries and each task's label is

    y_m = w_mᵀx + Σ_{i=1..S} sin(α_i w_mᵀx + β_i) + ε_m,    ε_m ~ N(0, σ²)

with the same ``α_i, β_i`` for both tasks, so the tasks differ only through their weight vectors::

    tasks = RelatedTasks.make(dim=100, correlation=0.5, generator=g)   # u1, u2, α, β drawn from g
    x_TD, y_TF = tasks.sample(10_000, generator=g)

**Inverse sinusoid** (Bishop, PRML §5.6, Figs. 5.19–5.21): the forward problem draws ``u ~ U(0, 1)`` and
``v = u + 0.3 sin(2πu) + e`` with ``e ~ U(−0.1, 0.1)``; the inverse problem exchanges the roles — input
``x = v``, target ``t = u`` — so that for x in the middle of the range three values of t are valid.
:func:`inverse_sinusoid_log_density` gives the exact conditional density ``log p(t | x)`` of that process
(the best any model can do), by integrating ``p(x) = ∫ p(x | u) du`` on a fine grid.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from moekit._validation import positive_int

__all__ = ["RelatedTasks", "inverse_sinusoid", "inverse_sinusoid_log_density", "orthonormal_pair"]


def orthonormal_pair(dim: int, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """Two random unit vectors ``u1 ⟂ u2`` in R^dim (Gram–Schmidt on two Gaussian draws), float64."""
    positive_int("dim", dim)
    if dim < 2:
        raise ValueError(f"dim: two orthogonal vectors need dim >= 2, got {dim}")
    a_2D = torch.randn(2, dim, generator=generator, dtype=torch.float64)
    u1 = a_2D[0] / a_2D[0].norm()
    v = a_2D[1] - (a_2D[1] @ u1) * u1
    return u1, v / v.norm()


@dataclass(frozen=True)
class RelatedTasks:
    """Two regression tasks whose weight vectors have cosine ``correlation`` (Ma et al. 2018)."""

    w_MD: Tensor        # (F, D) = (2, D) task weight vectors, |w_m| = scale
    alpha_S: Tensor     # (num_sines,) sine frequencies, shared by the tasks
    beta_S: Tensor      # (num_sines,) sine phases, shared by the tasks
    noise_std: float    # σ of the label noise ε_m
    correlation: float  # p = cos(w1, w2)

    @classmethod
    def make(cls, dim: int, correlation: float, *, scale: float = 1.0, num_sines: int = 10,
             sine_std: float = 1.0, noise_std: float = 0.1,
             generator: torch.Generator | None = None) -> "RelatedTasks":
        """Draw ``u1 ⟂ u2`` and ``α_i, β_i ~ N(0, sine_std²)`` from ``generator`` and build the two tasks."""
        positive_int("dim", dim)
        positive_int("num_sines", num_sines)
        p = float(correlation)
        if not -1.0 <= p <= 1.0:
            raise ValueError(f"correlation: must lie in [-1, 1], got {correlation!r}")
        if not (scale > 0 and math.isfinite(scale)):
            raise ValueError(f"scale: must be a positive number, got {scale!r}")
        if not (noise_std >= 0 and math.isfinite(noise_std)):
            raise ValueError(f"noise_std: must be a non-negative number, got {noise_std!r}")
        if not (sine_std >= 0 and math.isfinite(sine_std)):
            raise ValueError(f"sine_std: must be a non-negative number, got {sine_std!r}")
        u1, u2 = orthonormal_pair(dim, generator)
        w_MD = torch.stack([scale * u1, scale * (p * u1 + math.sqrt(max(0.0, 1.0 - p * p)) * u2)])
        alpha_S = sine_std * torch.randn(num_sines, generator=generator, dtype=torch.float64)
        beta_S = sine_std * torch.randn(num_sines, generator=generator, dtype=torch.float64)
        return cls(w_MD, alpha_S, beta_S, float(noise_std), p)

    @property
    def dim(self) -> int:
        return self.w_MD.shape[1]

    def clean_labels(self, x_ND: Tensor) -> Tensor:
        """(T, F) = (T, 2) noise-free labels ``w_mᵀx + Σ_i sin(α_i w_mᵀx + β_i)``."""
        z_TF = x_ND.to(torch.float64) @ self.w_MD.T
        return z_TF + torch.sin(z_TF[..., None] * self.alpha_S + self.beta_S).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None,
               dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
        """``n`` examples: inputs ``x_TD ~ N(0, I)`` and noisy labels ``y_TF``, both of ``dtype``."""
        positive_int("n", n)
        x_TD = torch.randn(n, self.dim, generator=generator, dtype=torch.float64)
        y_TF = self.clean_labels(x_TD)
        y_TF = y_TF + self.noise_std * torch.randn(y_TF.shape, generator=generator, dtype=torch.float64)
        return x_TD.to(dtype), y_TF.to(dtype)


def _forward_curve(u: Tensor, amplitude: float) -> Tensor:
    return u + amplitude * torch.sin(2 * math.pi * u)


def inverse_sinusoid(n: int, generator: torch.Generator | None = None, *, amplitude: float = 0.3,
                     noise: float = 0.1, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """PRML §5.6's inverse problem: ``(x_T, t_T)`` with ``x = t + amplitude·sin(2πt) + U(−noise, noise)``,
    ``t ~ U(0, 1)``; the model must map x to the (multi-valued) t."""
    positive_int("n", n)
    if not noise > 0:
        raise ValueError(f"noise: the half-width of the uniform noise must be > 0, got {noise!r}")
    t_T = torch.rand(n, generator=generator, dtype=torch.float64)
    e_T = (2 * torch.rand(n, generator=generator, dtype=torch.float64) - 1) * noise
    return (_forward_curve(t_T, amplitude) + e_T).to(dtype), t_T.to(dtype)


def inverse_sinusoid_log_density(x_N: Tensor, t_N: Tensor, *, amplitude: float = 0.3, noise: float = 0.1,
                                 grid: int = 1_000_001) -> Tensor:
    """Exact ``log p(t | x)`` of :func:`inverse_sinusoid` (−inf outside the support), float64, shape (T,).

    ``p(t | x) = p(x | t) p(t) / p(x)`` with ``p(t) = 1`` on [0, 1] and ``p(x | t) = 1/(2·noise)`` when
    ``|x − f(t)| ≤ noise``, so ``p(x) = (F(x + noise) − F(x − noise)) / (2·noise)`` where F is the distribution
    function of ``f(U)``, U ~ U(0, 1); F is read off ``grid`` sorted values of f on a uniform grid
    (error ≈ 1/grid). Inside the support ``p(t | x) = 1 / (F(x + noise) − F(x − noise))`` — flat in t.
    """
    positive_int("grid", grid)
    x = x_N.to(torch.float64).reshape(-1)
    t = t_N.to(torch.float64).reshape(-1)
    if x.shape != t.shape:
        raise ValueError(f"t_N: expected the shape of x_N {tuple(x_N.shape)}, got {tuple(t_N.shape)}")
    f_sorted = _forward_curve(torch.linspace(0.0, 1.0, grid, dtype=torch.float64), amplitude).sort().values

    def cdf(y: Tensor) -> Tensor:
        return torch.searchsorted(f_sorted, y, right=True).to(torch.float64) / grid

    mass = cdf(x + noise) - cdf(x - noise)           # P(|x − f(U)| ≤ noise) = 2·noise·p(x)
    in_support = ((x - _forward_curve(t, amplitude)).abs() <= noise) & (t >= 0) & (t <= 1) & (mass > 0)
    log_p = -mass.clamp_min(1e-300).log()
    return torch.where(in_support, log_p, torch.full_like(log_p, -math.inf))
