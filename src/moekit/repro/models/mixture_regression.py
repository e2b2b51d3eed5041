"""Mixture of linear regression models fitted by EM (Bishop, PRML §14.5.1).

Legend: T examples, D basis functions (input features φ(x), include a constant for a bias), E components
(the experts); see the package legend. The public names keep their historical suffixes: the arguments
``phi_NP`` (T, D), ``t_N`` (T,) and ``gamma_NK`` (T, E), the fields ``weights_KP`` (E, D), ``log_mix_K`` and
``var_K`` (E,).

Model: ``p(t | φ) = Σ_k π_k N(t | w_kᵀφ, σ_k²)`` with input-independent mixing coefficients π_k.
PRML uses one precision β shared by the components (``variance="shared"``); ``"per_component"`` gives
each its own σ_k² (the likelihood is then unbounded — a component can collapse onto a single point —
so σ_k² is kept at or above ``min_var``).

EM, with responsibilities ``γ_nk = π_k N(t_n | w_kᵀφ_n, σ_k²) / Σ_j π_j N(t_n | w_jᵀφ_n, σ_j²)`` (E step):

* ``π_k = (1/N) Σ_n γ_nk``
* ``w_k = (Φᵀ R_k Φ)⁻¹ Φᵀ R_k t`` with ``R_k = diag(γ_·k)``  (weighted least squares, PRML eq. 14.42)
* shared: ``σ² = (1/N) Σ_n Σ_k γ_nk (t_n − w_kᵀφ_n)²``  (PRML eq. 14.44, σ² = β⁻¹);
  per component: ``σ_k² = Σ_n γ_nk (t_n − w_kᵀφ_n)² / Σ_n γ_nk``

Each M step maximises the expected complete-data log-likelihood exactly (also under the ``min_var``
bound, since that objective is unimodal in σ²), so the log-likelihood never decreases; ``fit`` records it
after every step and the tests check that. Computations are in float64.

Usage::

    phi_NP = torch.stack([torch.ones_like(x_N), x_N], -1)          # straight lines in x
    model = MixtureOfLinearRegressions.fit(phi_NP, t_N, num_components=3, generator=g)
    model.log_likelihood_trace      # [LL after init, after step 1, ...], non-decreasing
    model.log_prob(phi_NP, t_N)     # (T,) log p(t | φ)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from moekit._validation import positive_int

__all__ = ["MixtureOfLinearRegressions", "VARIANCES"]

VARIANCES = ("shared", "per_component")
_LOG_2PI = math.log(2 * math.pi)


def _check_data(phi_NP: Tensor, t_N: Tensor) -> tuple[Tensor, Tensor]:
    if not isinstance(phi_NP, Tensor) or phi_NP.dim() != 2:
        raise ValueError(f"phi_NP: expected a (T, D) tensor of basis-function values, got "
                         f"{tuple(phi_NP.shape) if isinstance(phi_NP, Tensor) else type(phi_NP).__name__}")
    if not isinstance(t_N, Tensor) or t_N.shape != phi_NP.shape[:1]:
        raise ValueError(f"t_N: expected shape ({phi_NP.shape[0]},) (one target per row of phi_NP), got "
                         f"{tuple(t_N.shape) if isinstance(t_N, Tensor) else type(t_N).__name__}")
    return phi_NP.to(torch.float64), t_N.to(torch.float64)


@dataclass
class MixtureOfLinearRegressions:
    """Parameters of the mixture, with the EM steps and the fitted model's densities."""

    weights_KP: Tensor          # (E, D) regression coefficients w_k
    log_mix_K: Tensor           # (E,) log π_k
    var_K: Tensor               # (E,) σ_k² (all equal when variance="shared")
    variance: str = "shared"
    min_var: float = 1e-6
    log_likelihood_trace: list[float] = field(default_factory=list)   # total log-likelihood per EM step

    def __post_init__(self) -> None:
        if self.variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES}, got {self.variance!r}")
        E = self.weights_KP.shape[0]
        if self.log_mix_K.shape != (E,) or self.var_K.shape != (E,):
            raise ValueError(f"log_mix_K, var_K: expected shape ({E},) each, got {tuple(self.log_mix_K.shape)} "
                             f"and {tuple(self.var_K.shape)}")

    @property
    def num_components(self) -> int:
        return self.weights_KP.shape[0]

    # ---- densities -------------------------------------------------------------------------------
    def component_means(self, phi_NP: Tensor) -> Tensor:
        """(T, E) ``w_kᵀφ_n``."""
        return phi_NP.to(torch.float64) @ self.weights_KP.T

    def _log_joint(self, phi_NP: Tensor, t_N: Tensor) -> Tensor:
        r_TE = t_N[:, None] - self.component_means(phi_NP)
        log_n_TE = -0.5 * (r_TE.pow(2) / self.var_K + self.var_K.log() + _LOG_2PI)
        return self.log_mix_K + log_n_TE

    def log_prob(self, phi_NP: Tensor, t_N: Tensor) -> Tensor:
        """(T,) ``log p(t_n | φ_n) = log Σ_k π_k N(t_n | w_kᵀφ_n, σ_k²)``."""
        phi_NP, t_N = _check_data(phi_NP, t_N)
        return torch.logsumexp(self._log_joint(phi_NP, t_N), -1)

    def responsibilities(self, phi_NP: Tensor, t_N: Tensor) -> Tensor:
        """(T, E) posterior ``γ_nk`` (the E step)."""
        phi_NP, t_N = _check_data(phi_NP, t_N)
        return torch.softmax(self._log_joint(phi_NP, t_N), -1)

    def mean(self, phi_NP: Tensor) -> Tensor:
        """(T,) the conditional mean ``Σ_k π_k w_kᵀφ_n``."""
        return self.component_means(phi_NP) @ self.log_mix_K.exp()

    # ---- EM ----------------------------------------------------------------------------------------
    def m_step(self, phi_NP: Tensor, t_N: Tensor, gamma_NK: Tensor) -> "MixtureOfLinearRegressions":
        """The parameters that maximise the expected complete-data log-likelihood under ``gamma_NK``."""
        phi_NP, t_N = _check_data(phi_NP, t_N)
        T, E = gamma_NK.shape
        nk_E = gamma_NK.sum(0)
        log_mix_E = (nk_E / T).clamp_min(1e-300).log()
        # weighted least squares per component: rows scaled by √γ_nk (lstsq also handles Σγ ≈ 0 gracefully)
        sqrt_ET1 = gamma_NK.T.sqrt()[..., None]
        sol = torch.linalg.lstsq(sqrt_ET1 * phi_NP, sqrt_ET1 * t_N[None, :, None], driver="gelsd").solution
        weights_ED = sol[..., 0]
        sq_TE = (t_N[:, None] - phi_NP @ weights_ED.T).pow(2)
        if self.variance == "shared":
            var_E = ((gamma_NK * sq_TE).sum() / T).expand(E).clone()
        else:
            var_E = (gamma_NK * sq_TE).sum(0) / nk_E.clamp_min(1e-300)
        var_E = var_E.clamp_min(self.min_var)
        return MixtureOfLinearRegressions(weights_ED, log_mix_E, var_E, self.variance, self.min_var,
                                          list(self.log_likelihood_trace))

    def em_step(self, phi_NP: Tensor, t_N: Tensor) -> "MixtureOfLinearRegressions":
        """One E step then one M step."""
        return self.m_step(phi_NP, t_N, self.responsibilities(phi_NP, t_N))

    @classmethod
    def initial(cls, phi_NP: Tensor, t_N: Tensor, num_components: int, *, variance: str = "shared",
                min_var: float = 1e-6, generator: torch.Generator | None = None) -> "MixtureOfLinearRegressions":
        """A random start: each component is the least-squares fit to a random subset of D+1 examples
        (so the components start on different lines), equal π_k, and σ² the variance of t."""
        positive_int("num_components", num_components)
        phi_NP, t_N = _check_data(phi_NP, t_N)
        T, D = phi_NP.shape
        if T < D + 1:
            raise ValueError(f"phi_NP: need at least D+1 = {D + 1} examples, got {T}")
        ws = []
        for _ in range(num_components):
            idx = torch.randperm(T, generator=generator)[:D + 1]
            ws.append(torch.linalg.lstsq(phi_NP[idx], t_N[idx, None], driver="gelsd").solution[:, 0])
        var = float(t_N.var(unbiased=False).clamp_min(min_var))
        return cls(torch.stack(ws), torch.full((num_components,), -math.log(num_components), dtype=torch.float64),
                   torch.full((num_components,), var, dtype=torch.float64), variance, min_var)

    @classmethod
    def fit(cls, phi_NP: Tensor, t_N: Tensor, num_components: int, *, variance: str = "shared",
            max_iter: int = 500, tol: float = 1e-9, restarts: int = 1, min_var: float = 1e-6,
            generator: torch.Generator | None = None) -> "MixtureOfLinearRegressions":
        """EM from ``restarts`` random starts (:meth:`initial`); returns the one of highest log-likelihood.

        Stops when one step raises the total log-likelihood by less than ``tol`` per example.
        ``log_likelihood_trace`` of the result holds the total log-likelihood after the start and after each step.
        """
        positive_int("max_iter", max_iter)
        positive_int("restarts", restarts)
        if variance not in VARIANCES:
            raise ValueError(f"variance: expected one of {VARIANCES}, got {variance!r}")
        phi_NP, t_N = _check_data(phi_NP, t_N)
        T = phi_NP.shape[0]
        best = None
        for _ in range(restarts):
            model = cls.initial(phi_NP, t_N, num_components, variance=variance, min_var=min_var, generator=generator)
            trace = [float(model.log_prob(phi_NP, t_N).sum())]
            for _ in range(max_iter):
                model = model.em_step(phi_NP, t_N)
                trace.append(float(model.log_prob(phi_NP, t_N).sum()))
                if trace[-1] - trace[-2] < tol * T:
                    break
            model.log_likelihood_trace = trace
            if best is None or trace[-1] > best.log_likelihood_trace[-1]:
                best = model
        return best
