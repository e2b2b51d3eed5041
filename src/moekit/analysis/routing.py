"""Routing diagnostics: who went where, how specialised, how balanced.

Legend (the package's, ``moekit/__init__.py``): T examples/tokens, E experts, Y labels (clusters, classes,
vowels, ...).
"""
from __future__ import annotations

import torch
from torch import Tensor


def _as_long(name: str, v: Tensor | object) -> Tensor:
    t = torch.as_tensor(v)
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.dtype.is_complex:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {t.dtype}")
    return t.reshape(-1).long()


def routing_table(expert_ids_T: Tensor, labels_T: Tensor, num_experts: int, num_labels: int) -> Tensor:
    """Counts ``table_EY[e, y]`` = number of examples with label ``y`` routed to expert ``e``: (E, Y).

    ``expert_ids_T`` (T,) may also be ``(T, k)`` (top-k): every slot counts once; ``labels_T`` (T,).
    """
    ids = torch.as_tensor(expert_ids_T)
    labels = _as_long("labels_T", labels_T)
    if ids.dim() == 2:  # (T, k): repeat each label k times
        labels = labels[:, None].expand(-1, ids.shape[1]).reshape(-1)
    ids = _as_long("expert_ids_T", ids)
    if ids.numel() != labels.numel():
        raise ValueError(f"expert_ids_T and labels_T: sizes differ ({ids.numel()} vs {labels.numel()})")
    if num_experts < 1 or num_labels < 1:
        raise ValueError(f"num_experts and num_labels: must be >= 1, got {num_experts}, {num_labels}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= num_experts):
        raise ValueError(f"expert_ids_T: values must lie in [0, num_experts={num_experts})")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_labels):
        raise ValueError(f"labels_T: values must lie in [0, num_labels={num_labels})")
    flat = ids.cpu() * num_labels + labels.cpu()
    return torch.bincount(flat, minlength=num_experts * num_labels).reshape(num_experts, num_labels)


def dispatch_entropy(expert_ids_T: Tensor, labels_T: Tensor, num_experts: int, num_labels: int) -> float:
    """Chen et al. 2022's dispatch entropy, in nats.

    ``entropy = Σ_e (n_e / n) · (−Σ_y p_{e,y} ln p_{e,y})`` with ``p_{e,y}`` the share of label ``y``
    among the ``n_e`` examples routed to expert ``e``. 0 means every expert sees a single label; ``ln Y``
    (Y labels) means every expert sees a uniform mix. Experts that receive nothing contribute 0.
    """
    table = routing_table(expert_ids_T, labels_T, num_experts, num_labels).double()
    n = table.sum()
    if n == 0:
        return 0.0
    n_e = table.sum(1, keepdim=True)
    p = table / n_e.clamp_min(1)
    h_e = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(1)
    return float((n_e.squeeze(1) / n * h_e).sum())


def load_stats(tokens_per_expert_E: Tensor) -> dict[str, float]:
    """Balance summary of a per-expert count/load vector.

    ``cv`` = std/mean (population std, as the balance losses use), ``max_over_mean``,
    ``experts_used`` (experts with a non-zero load) and ``min_share`` / ``max_share`` of the total.
    """
    load = torch.as_tensor(tokens_per_expert_E).detach().double().reshape(-1)
    if load.numel() == 0:
        raise ValueError("tokens_per_expert_E: expected at least one expert")
    total, mean = load.sum(), load.mean()
    safe_mean = mean if mean > 0 else torch.ones(())
    return {
        "cv": float(load.std(unbiased=False) / safe_mean) if load.numel() > 1 else 0.0,
        "max_over_mean": float(load.max() / safe_mean),
        "experts_used": int((load > 0).sum()),
        "min_share": float(load.min() / total) if total > 0 else 0.0,
        "max_share": float(load.max() / total) if total > 0 else 0.0,
    }
