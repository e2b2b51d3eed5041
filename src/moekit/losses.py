"""Balancing and stability losses for routers, as pure functions.

Legend: T tokens, E experts, K experts per token.
Each function returns the *unweighted* loss; routers multiply by their coefficient.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "cv_squared", "importance", "importance_loss", "shazeer_load", "shazeer_load_loss",
    "vmoe_load", "vmoe_load_loss", "balance_loss", "switch_aux_loss", "gshard_aux_loss", "router_z_loss",
]

_SQRT2 = 2.0 ** 0.5


def _normal_cdf(z: Tensor) -> Tensor:
    return 0.5 * (1.0 + torch.erf(z / _SQRT2))


def cv_squared(v: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation ``CV(v)^2 = Var(v) / (mean(v)^2 + eps)``.

    Population variance, as in Shazeer et al. 2017. A vector of one element has CV 0.
    """
    v = v.float() if v.dtype not in (torch.float32, torch.float64) else v
    if v.numel() <= 1:
        return v.sum() * 0.0
    return v.var(unbiased=False) / (v.mean() ** 2 + eps)


def importance(gates_TE: Tensor) -> Tensor:
    """``Importance(X)_i = Σ_x G(x)_i`` (Shazeer 2017, eq. 6)."""
    return gates_TE.sum(dim=0)


def importance_loss(gates_TE: Tensor) -> Tensor:
    """``L_importance = CV(Importance(X))^2`` (Shazeer 2017, eq. 7, without the weight)."""
    return cv_squared(importance(gates_TE))


def shazeer_load(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor | None, k: int) -> Tensor:
    """Smooth load estimator of Shazeer 2017 (appendix A): ``Load(X)_i = Σ_x P(x, i)``.

    ``P(x,i) = Φ(((x W_g)_i − kth_excluding(H(x), k, i)) / noise_std_i(x))``, where
    ``kth_excluding(H, k, i)`` is the k-th largest entry of H with entry i left out: the (k+1)-th largest
    of H when i is in the top k, else the k-th largest. P(x,i) is the probability that expert i stays in
    the top k when only its own noise is redrawn.

    Edge cases: with ``k >= E`` every expert is always selected (P = 1); with no noise
    (``noise_std_TE`` None or all zero) P is the hard top-k indicator.
    """
    T, E = clean_logits_TE.shape
    if k >= E:
        return clean_logits_TE.new_full((E,), float(T))
    top_vals_TK1, top_ids_TK1 = noisy_logits_TE.topk(k + 1, dim=-1)
    thr_if_in_T1 = top_vals_TK1[:, k:k + 1]        # (k+1)-th largest: the bar to beat when i is in the top k
    thr_if_out_T1 = top_vals_TK1[:, k - 1:k]       # k-th largest: the bar to beat when i is outside
    # Membership from the top-k indices themselves (so ties resolve exactly as the router's topk does).
    is_in_TE = torch.zeros_like(noisy_logits_TE, dtype=torch.bool).scatter(1, top_ids_TK1[:, :k], True)
    if noise_std_TE is None or not bool((torch.as_tensor(noise_std_TE) > 0).any()):
        return is_in_TE.to(clean_logits_TE.dtype).sum(dim=0)
    p_in_TE = _normal_cdf((clean_logits_TE - thr_if_in_T1) / noise_std_TE)
    p_out_TE = _normal_cdf((clean_logits_TE - thr_if_out_T1) / noise_std_TE)
    return torch.where(is_in_TE, p_in_TE, p_out_TE).sum(dim=0)


def shazeer_load_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor | None, k: int) -> Tensor:
    """``L_load = CV(Load(X))^2`` (Shazeer 2017, eq. 11, without the weight)."""
    return cv_squared(shazeer_load(clean_logits_TE, noisy_logits_TE, noise_std_TE, k))


def vmoe_load(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """V-MoE's load (Riquelme 2021): ``load_i = mean_x [1 − Φ((threshold_k(x) − logits_i(x)) / σ)]``.

    ``threshold_k(x)`` is the k-th largest *noisy* logit of x (the expert itself included).
    """
    E = clean_logits_TE.shape[-1]
    if k > E:
        raise ValueError(f"k: must be <= number of experts ({E}), got {k}")
    thr_T1 = noisy_logits_TE.topk(k, dim=-1).values[:, k - 1:k]
    p_TE = 1.0 - _normal_cdf((thr_T1 - clean_logits_TE) / noise_std)
    return p_TE.mean(dim=0)


def vmoe_load_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """``L_load = (std(load) / mean(load))^2`` with V-MoE's load (population std)."""
    return cv_squared(vmoe_load(clean_logits_TE, noisy_logits_TE, noise_std, k))


def _assignment_fraction(expert_ids_TK: Tensor, num_experts: int, dtype: torch.dtype) -> Tensor:
    counts_E = torch.bincount(expert_ids_TK.reshape(-1), minlength=num_experts)[:num_experts]
    return counts_E.to(dtype) / max(expert_ids_TK.numel(), 1)


def balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """``E · Σ_i f_i P_i`` for any per-token score distribution ``probs_TE`` (rows summing to 1)."""
    E = probs_TE.shape[-1]
    f_E = _assignment_fraction(expert_ids_TK, E, probs_TE.dtype)
    return E * (f_E * probs_TE.mean(dim=0)).sum()


def switch_aux_loss(logits_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i P_i`` (Fedus 2021, eq. 4, without α).

    ``f_i``: fraction of the T·K assignments that go to expert i; ``P_i``: mean router probability
    ``softmax(logits)_i`` over tokens. Perfectly uniform routing gives exactly 1.0.
    """
    return balance_loss(torch.softmax(logits_TE.float(), dim=-1), expert_ids_TK)


def gshard_aux_loss(logits_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """GShard's ``E^2 · mean_e(m_e · ḡ_e)`` with m the top-1 dispatch fraction, ḡ the mean gate."""
    E = logits_TE.shape[-1]
    probs_TE = torch.softmax(logits_TE.float(), dim=-1)
    m_E = _assignment_fraction(expert_ids_TK[:, :1], E, probs_TE.dtype)
    return E * E * (m_E * probs_TE.mean(dim=0)).mean()


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_x (logsumexp_j logits_j(x))^2`` (Zoph 2022, eq. 5)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
