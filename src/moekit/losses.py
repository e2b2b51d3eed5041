"""Balancing and stability losses for routers, as pure functions.

Legend: T tokens, E experts, K experts per token, G routing groups.
Each function returns the *unweighted* loss; routers multiply by their coefficient.

Routers form their losses from :class:`moekit.stats.RoutingStats` (per-expert sums that can be added
over micro-batches and all-reduced over processes) with the ``*_from_stats`` functions; the
functions taking logits/gates are the same losses for one batch, kept for direct use and tests.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .stats import RoutingStats

__all__ = [
    "cv_squared", "importance", "importance_loss", "shazeer_load", "shazeer_load_loss",
    "vmoe_load", "vmoe_load_loss", "balance_loss", "switch_aux_loss", "gshard_aux_loss", "router_z_loss",
    "shazeer_load_per_token", "vmoe_load_per_token", "switch_loss_from_stats", "gshard_loss_from_stats",
    "importance_loss_from_stats", "load_loss_from_stats", "z_loss_from_stats",
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


def shazeer_load_per_token(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor | float | None,
                           k: int) -> Tensor:
    """``P(x, i)`` of Shazeer 2017 (appendix A), one row per token: the probability that expert i stays
    in the top k of ``H(x)`` when only its own noise is redrawn.

    ``P(x,i) = Φ(((x W_g)_i − kth_excluding(H(x), k, i)) / noise_std_i(x))``, where
    ``kth_excluding(H, k, i)`` is the k-th largest entry of H with entry i left out: the (k+1)-th largest
    of H when i is in the top k, else the k-th largest.

    Edge cases: with ``k >= E`` every expert is always selected (P = 1); where the noise std is 0 (or
    ``noise_std_TE`` is None) P is the hard top-k indicator. No host synchronisation.
    """
    T, E = clean_logits_TE.shape
    if k >= E:
        return clean_logits_TE.new_ones(T, E)
    top_vals_TK1, top_ids_TK1 = noisy_logits_TE.topk(k + 1, dim=-1)
    thr_if_in_T1 = top_vals_TK1[:, k:k + 1]        # (k+1)-th largest: the bar to beat when i is in the top k
    thr_if_out_T1 = top_vals_TK1[:, k - 1:k]       # k-th largest: the bar to beat when i is outside
    # Membership from the top-k indices themselves (so ties resolve exactly as the router's topk does).
    is_in_TE = torch.zeros_like(noisy_logits_TE, dtype=torch.bool).scatter(1, top_ids_TK1[:, :k], True)
    hard_TE = is_in_TE.to(clean_logits_TE.dtype)
    if noise_std_TE is None:
        return hard_TE
    std_TE = torch.as_tensor(noise_std_TE, dtype=clean_logits_TE.dtype, device=clean_logits_TE.device)
    safe_std_TE = torch.where(std_TE > 0, std_TE, torch.ones_like(std_TE))
    thr_TE = torch.where(is_in_TE, thr_if_in_T1, thr_if_out_T1)
    p_TE = _normal_cdf((clean_logits_TE - thr_TE) / safe_std_TE)
    return torch.where(std_TE > 0, p_TE, hard_TE)


def shazeer_load(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor | float | None,
                 k: int) -> Tensor:
    """Smooth load estimator of Shazeer 2017 (appendix A): ``Load(X)_i = Σ_x P(x, i)``
    (see :func:`shazeer_load_per_token`)."""
    return shazeer_load_per_token(clean_logits_TE, noisy_logits_TE, noise_std_TE, k).sum(dim=0)


def shazeer_load_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std_TE: Tensor | None, k: int) -> Tensor:
    """``L_load = CV(Load(X))^2`` (Shazeer 2017, eq. 11, without the weight)."""
    return cv_squared(shazeer_load(clean_logits_TE, noisy_logits_TE, noise_std_TE, k))


def vmoe_load_per_token(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """V-MoE's per-token load (Riquelme 2021): ``p_i(x) = 1 − Φ((threshold_k(x) − logits_i(x)) / σ)``.

    ``threshold_k(x)`` is the k-th largest *noisy* logit of x (the expert itself included).
    """
    E = clean_logits_TE.shape[-1]
    if k > E:
        raise ValueError(f"k: must be <= number of experts ({E}), got {k}")
    thr_T1 = noisy_logits_TE.topk(k, dim=-1).values[:, k - 1:k]
    return 1.0 - _normal_cdf((thr_T1 - clean_logits_TE) / noise_std)


def vmoe_load(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """V-MoE's load ``load_i = mean_x p_i(x)`` (see :func:`vmoe_load_per_token`)."""
    return vmoe_load_per_token(clean_logits_TE, noisy_logits_TE, noise_std, k).mean(dim=0)


def vmoe_load_loss(clean_logits_TE: Tensor, noisy_logits_TE: Tensor, noise_std: float | Tensor, k: int) -> Tensor:
    """``L_load = (std(load) / mean(load))^2`` with V-MoE's load (population std)."""
    return cv_squared(vmoe_load(clean_logits_TE, noisy_logits_TE, noise_std, k))


# ---------------------------------------------------------------------------------------------------
# Losses from routing statistics (moekit.stats.RoutingStats): per routing group, averaged over groups.
# ---------------------------------------------------------------------------------------------------

def _group_mean(v_G: Tensor, num_tokens_G: Tensor) -> Tensor:
    """Mean over the routing groups that hold a real token (a group of padding only counts nowhere);
    0 (not NaN) when there is none."""
    occupied_G = (num_tokens_G > 0).to(v_G.dtype)
    return (v_G * occupied_G).sum() / occupied_G.sum().clamp_min(1)


def _cv_squared_rows(v_GE: Tensor, eps: float = 1e-10) -> Tensor:
    if v_GE.shape[-1] <= 1:
        return v_GE.sum(-1) * 0.0
    return v_GE.var(dim=-1, unbiased=False) / (v_GE.mean(dim=-1) ** 2 + eps)


def switch_loss_from_stats(stats: RoutingStats) -> Tensor:
    """``E · Σ_i f_i P_i`` per group (``f_i = counts_i / (T·k)``, ``P_i = prob_sum_i / T``), mean over groups."""
    n_G1 = stats.num_tokens.clamp_min(1.0)[:, None]
    f_GE = stats.counts / (n_G1 * stats.top_k)
    P_GE = stats.prob_sum / n_G1
    return _group_mean(stats.num_experts * (f_GE * P_GE).sum(-1), stats.num_tokens)


def gshard_loss_from_stats(stats: RoutingStats) -> Tensor:
    """GShard's ``E² · mean_e(m_e · ḡ_e)`` per group (``m_e`` top-1 fraction, ``ḡ_e`` mean gate)."""
    n_G1 = stats.num_tokens.clamp_min(1.0)[:, None]
    E = stats.num_experts
    return _group_mean(E * E * ((stats.top1_counts / n_G1) * (stats.prob_sum / n_G1)).mean(-1), stats.num_tokens)


def importance_loss_from_stats(stats: RoutingStats) -> Tensor:
    """``CV(Importance)²`` per group, mean over groups."""
    return _group_mean(_cv_squared_rows(stats.importance), stats.num_tokens)


def load_loss_from_stats(stats: RoutingStats) -> Tensor | None:
    """``CV(Load)²`` per group, mean over groups (None when the router has no load estimate).
    CV is scale-free, so Shazeer's sum and V-MoE's mean give the same loss."""
    return None if stats.load is None else _group_mean(_cv_squared_rows(stats.load), stats.num_tokens)


def z_loss_from_stats(stats: RoutingStats) -> Tensor:
    """Router z-loss ``mean_x logsumexp(logits(x))²`` per group, mean over groups."""
    return _group_mean(stats.z_sum / stats.num_tokens.clamp_min(1.0), stats.num_tokens)


def _stats_from_dense(probs_TE: Tensor, expert_ids_TK: Tensor, logits_TE: Tensor | None = None) -> RoutingStats:
    """Statistics of one group of tokens, for the convenience losses below."""
    T, E = probs_TE.shape
    ones_TK = probs_TE.new_ones(expert_ids_TK.shape)
    counts_E = probs_TE.new_zeros(E).scatter_add(0, expert_ids_TK.reshape(-1), ones_TK.reshape(-1))
    top1_E = probs_TE.new_zeros(E).scatter_add(0, expert_ids_TK[:, 0], ones_TK[:, 0]) if T else probs_TE.new_zeros(E)
    z = torch.logsumexp(logits_TE.float(), -1).pow(2).sum() if logits_TE is not None else probs_TE.new_zeros(())
    return RoutingStats(num_tokens=probs_TE.new_full((1,), float(T)), counts=counts_E[None], top1_counts=top1_E[None],
                        prob_sum=probs_TE.sum(0)[None], importance=probs_TE.sum(0)[None], z_sum=z[None],
                        top_k=expert_ids_TK.shape[-1])


def balance_loss(probs_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """``E · Σ_i f_i P_i`` for any per-token score distribution ``probs_TE`` (rows summing to 1)."""
    return switch_loss_from_stats(_stats_from_dense(probs_TE, expert_ids_TK))


def switch_aux_loss(logits_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """Switch Transformer load-balancing loss ``E · Σ_i f_i P_i`` (Fedus 2021, eq. 4, without α).

    ``f_i``: fraction of the T·K assignments that go to expert i; ``P_i``: mean router probability
    ``softmax(logits)_i`` over tokens. Perfectly uniform routing gives exactly 1.0.
    """
    return balance_loss(torch.softmax(logits_TE.float(), dim=-1), expert_ids_TK)


def gshard_aux_loss(logits_TE: Tensor, expert_ids_TK: Tensor) -> Tensor:
    """GShard's ``E^2 · mean_e(m_e · ḡ_e)`` with m the top-1 dispatch fraction, ḡ the mean gate."""
    return gshard_loss_from_stats(_stats_from_dense(torch.softmax(logits_TE.float(), dim=-1), expert_ids_TK))


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE router z-loss ``mean_x (logsumexp_j logits_j(x))^2`` (Zoph 2022, eq. 5)."""
    return torch.logsumexp(logits_TE.float(), dim=-1).pow(2).mean()
