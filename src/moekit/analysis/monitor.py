"""RoutingMonitor: per-layer routing statistics of a whole model over training or evaluation steps.

Legend: E experts, N recorded steps of one layer.

Forward hooks on every :class:`moekit.MoE` inside a model (moekit's own models, or a transformers
model after :func:`moekit.hf.patch` / :func:`moekit.hf.upcycle`) keep, per layer and forward, the
detached per-expert token counts, dropped and total assignments and the router entropy. The hooks
only keep references to tensors the layer already computed (no host synchronisation); numbers are
read when a summary, table or report is asked for.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .tables import markdown_table


class RoutingMonitor:
    """Collect routing statistics of every MoE layer of ``model`` over steps (one step = one forward
    of that layer).

    ``RoutingMonitor(model)`` registers the hooks; ``remove()`` (or leaving a ``with`` block) removes
    them. ``max_steps`` keeps the last that many steps per layer (None = all).

    Per layer it reports (:meth:`summary`, :meth:`table`, :meth:`report`): steps, routed tokens,
    dropped assignments (fraction of all assignments), mean router entropy (nats), dead experts
    (no token in any recorded step), mean over steps of max/mean expert load, and the max/mean of the
    load summed over steps.
    """

    def __init__(self, model: nn.Module, max_steps: int | None = None):
        from ..layers.moe import MoE
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
            raise ValueError(f"max_steps: must be a positive int or None, got {max_steps!r}")
        self.max_steps = max_steps
        self.layers: dict[str, MoE] = {n or "<model>": m for n, m in model.named_modules() if isinstance(m, MoE)}
        if not self.layers:
            raise ValueError("model: has no moekit MoE layer (for a transformers model, call moekit.hf.patch first)")
        self.records: dict[str, list[dict[str, Tensor]]] = {n: [] for n in self.layers}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self.layers.items()]

    def _hook(self, name: str):
        def hook(module: nn.Module, args: Any, out: Any) -> None:
            metrics = out.metrics
            load = metrics.get("tokens_per_expert", metrics.get("slots_per_expert"))
            dropped = metrics["dropped_assignments"]
            self.records[name].append({
                "tokens_per_expert": load,
                "dropped": dropped,
                "total": load.sum() + dropped,            # executed + dropped assignments
                "entropy": metrics["router_entropy"],
            })
            if self.max_steps is not None and len(self.records[name]) > self.max_steps:
                del self.records[name][0]
        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        for v in self.records.values():
            v.clear()

    def __enter__(self) -> "RoutingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- summaries --------------------------------------------------------------------------------
    def load_history(self, layer: str) -> Tensor:
        """(N, E) tokens per expert of each recorded step of ``layer`` (float, CPU)."""
        if layer not in self.records:
            raise KeyError(f"layer: unknown {layer!r}; monitored layers: {list(self.records)}")
        recs = self.records[layer]
        E = self.layers[layer].num_experts
        if not recs:
            return torch.zeros(0, E)
        return torch.stack([r["tokens_per_expert"].float().cpu() for r in recs])

    def summary(self) -> list[dict[str, Any]]:
        """One dict of plain numbers per monitored layer (see the class docstring)."""
        rows = []
        for name, recs in self.records.items():
            E = self.layers[name].num_experts
            hist_NE = self.load_history(name)
            n = hist_NE.shape[0]
            total_E = hist_NE.sum(0)
            dropped = float(sum(r["dropped"].float().cpu() for r in recs)) if recs else 0.0
            assignments = float(sum(r["total"].float().cpu() for r in recs)) if recs else 0.0
            per_step = hist_NE.max(-1).values / hist_NE.mean(-1).clamp_min(1e-10) if n else torch.zeros(0)
            rows.append({
                "layer": name, "experts": E, "steps": n,
                "assignments": int(round(assignments)),
                "dropped_fraction": dropped / max(assignments, 1.0),
                "router_entropy": float(torch.stack([r["entropy"].float().cpu() for r in recs]).mean()) if n else 0.0,
                "dead_experts": int((total_E == 0).sum()) if n else 0,
                "max_over_mean_load": float(per_step.mean()) if n else 0.0,
                "max_over_mean_load_total": float(total_E.max() / total_E.mean().clamp_min(1e-10)) if n else 0.0,
            })
        return rows

    def table(self) -> str:
        """The summary as a markdown table."""
        header = ["layer", "experts", "steps", "assignments", "dropped", "entropy (nats)", "dead experts",
                  "max/mean load (per step)", "max/mean load (all steps)"]
        rows = [[r["layer"], r["experts"], r["steps"], r["assignments"], f"{r['dropped_fraction']:.1%}",
                 f"{r['router_entropy']:.3f}", r["dead_experts"], f"{r['max_over_mean_load']:.2f}",
                 f"{r['max_over_mean_load_total']:.2f}"] for r in self.summary()]
        return markdown_table(header, rows)

    def report(self, out_dir: str | Path, title: str = "Routing report") -> Path:
        """Write ``report.md`` (the table and one load heat-map per layer: rows = steps, columns =
        experts, share of the step's assignments) into ``out_dir``; returns the report's path.
        The heat-maps need matplotlib (``pip install 'moekit[experiments]'``)."""
        from .plots import _plt
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        plt = _plt()
        lines = [f"# {title}", "", self.table(), ""]
        for i, name in enumerate(self.records):
            hist_NE = self.load_history(name)
            if hist_NE.shape[0] == 0:
                continue
            share_NE = hist_NE / hist_NE.sum(-1, keepdim=True).clamp_min(1)
            fig, ax = plt.subplots(figsize=(1.5 + 0.3 * hist_NE.shape[1], 1.5 + 0.12 * hist_NE.shape[0]))
            im = ax.imshow(share_NE.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
            ax.set_xlabel("expert")
            ax.set_ylabel("step")
            ax.set_title(f"{name}: load per step")
            fig.colorbar(im, ax=ax, label="share of the step's assignments")
            fig.tight_layout()
            png = f"load_{i:02d}.png"
            fig.savefig(out / png, dpi=100)
            plt.close(fig)
            lines += [f"## {name}", "", f"![load of {name} per step]({png})", ""]
        path = out / "report.md"
        path.write_text("\n".join(lines))
        return path
