"""RoutingMonitor: per-layer routing statistics of a whole model over training or evaluation steps.

Legend: T tokens, K experts per token, A flat assignments, E experts, J recorded steps of one layer.

Forward hooks on every :class:`moekit.MoE` inside a model (moekit's own models, or a transformers
model after :func:`moekit.hf.patch` / :func:`moekit.hf.upcycle`) keep, per layer and forward, the
detached per-expert token counts, dropped and total assignments and the router entropy. The hooks
only keep references to tensors the layer already computed or small counts computed from them (no host
synchronisation); numbers are read when a summary, table or report is asked for.

Padding: only real tokens are counted. A layer called with its own ``mask`` already leaves masked
tokens out of its metrics. A layer called without one (a patched transformers model calls its MoE
blocks without a mask) routes the padding like any token; the monitor then takes the token mask of the
model forward (the ``attention_mask`` the model was called with, or one given with :meth:`set_mask`) and
counts, from the layer's routing decision, the assignments of the real tokens only.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .tables import markdown_table


def _capacity_keep_of(layer: nn.Module, d: Any, mask_T: Tensor | None, group_size: int | None) -> Tensor | None:
    """``keep_TK`` of a token-choice layer's capacity queues for the decision ``d`` it routed with the
    router mask ``mask_T`` (the layer's own group padding), or None when the layer is dropless."""
    from .. import dispatch
    if hasattr(layer, "_priority"):
        priority = layer._priority(d)
    else:                                      # a routing plan: its Batch Priority Routing key
        key = getattr(d, "priority_T", None)
        priority = key() if callable(key) else getattr(d, "priority", None)
    policy_cls = getattr(dispatch.capacity, "CapacityPolicy", None)
    policy = next((v for v in vars(layer).values() if policy_cls is not None and isinstance(v, policy_cls)), None)
    if policy is not None:
        if policy.dropless:
            return None
        return policy.keep(d.expert_ids, layer.num_experts, mask_T=mask_T, group_size=group_size, priority_T=priority)
    factor, capacity = getattr(layer, "capacity_factor", None), getattr(layer, "capacity", None)
    if factor is None and capacity is None:
        return None
    return dispatch.capacity_keep(d.expert_ids, layer.num_experts, factor, capacity=capacity, mask_T=mask_T,
                                  group_size=group_size,
                                  priority_T=priority if getattr(layer, "batch_priority", False) else None,
                                  multiple_of=getattr(layer, "capacity_multiple_of", 1))


class RoutingMonitor:
    """Collect routing statistics of every MoE layer of ``model`` over steps (one step = one forward
    of that layer).

    ``RoutingMonitor(model)`` registers the hooks; ``remove()`` (or leaving a ``with`` block) removes
    them. ``max_steps`` keeps the last that many steps per layer (None = all).

    Per layer it reports (:meth:`summary`, :meth:`table`, :meth:`report`): steps, routed tokens,
    dropped assignments (fraction of all assignments), mean router entropy (nats), dead experts
    (no token in any recorded step), mean over steps of max/mean expert load, and the max/mean of the
    load summed over steps.

    Padded batches: with ``capture_attention_mask`` (the default) a pre-hook on ``model`` keeps the
    ``attention_mask`` argument of each model forward (transformers' convention, 1 = real token, shape
    (B, L) with the layer's S tokens the last S columns, as in generation with a cache) while that
    forward runs, and the layers' counts leave out the tokens it marks as padding. Encoder-decoder
    models are not captured (their attention mask covers the encoder's tokens only): call
    :meth:`set_mask` there, or for a model of your own whose layers run without a mask. A layer called
    with its own ``mask`` is counted with that mask.
    """

    def __init__(self, model: nn.Module, max_steps: int | None = None, *, capture_attention_mask: bool = True):
        from ..layers.moe import MoE
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
        if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
            raise ValueError(f"max_steps: must be a positive int or None, got {max_steps!r}")
        self.max_steps = max_steps
        self.layers: dict[str, MoE] = {n or "<model>": m for n, m in model.named_modules() if isinstance(m, MoE)}
        if not self.layers:
            raise ValueError("model: has no moekit MoE layer (for a transformers model, call moekit.hf.patch first)")
        if not isinstance(capture_attention_mask, bool):
            raise TypeError(f"capture_attention_mask: expected a bool, got {capture_attention_mask!r}")
        self.records: dict[str, list[dict[str, Tensor]]] = {n: [] for n in self.layers}
        self._mask: Tensor | None = None                  # set_mask: until cleared
        self._forward_mask: Tensor | None = None          # captured attention_mask of the running model forward
        self._router_call: dict[str, tuple[tuple, dict, Any]] = {}
        self._handles = []
        for n, m in self.layers.items():
            self._handles.append(m.router.register_forward_hook(self._router_hook(n), with_kwargs=True))
            self._handles.append(m.register_forward_hook(self._hook(n), with_kwargs=True))
        config = getattr(model, "config", None)
        if capture_attention_mask and not getattr(config, "is_encoder_decoder", False):
            try:
                self._signature: inspect.Signature | None = inspect.signature(model.forward)
            except (TypeError, ValueError):
                self._signature = None
            self._handles.append(model.register_forward_pre_hook(self._capture_mask, with_kwargs=True))
            self._handles.append(model.register_forward_hook(self._release_mask, always_call=True))

    # ---- token masks ------------------------------------------------------------------------------
    def set_mask(self, mask: Tensor | None) -> None:
        """Count only the tokens where ``mask`` is true (1) in the following forwards, until
        ``set_mask(None)``; it takes precedence over a captured ``attention_mask``. ``mask`` has the
        layers' leading token shape (e.g. (B, S)) or is (B, L) with the layers' S tokens the last S
        columns. Layers called with their own ``mask`` are counted with that one."""
        if mask is not None:
            if not isinstance(mask, Tensor):
                raise TypeError(f"mask: expected a tensor or None, got {type(mask).__name__}")
            if mask.is_floating_point() or mask.is_complex():
                raise TypeError(f"mask: expected a bool or integer (0/1) tensor, got {mask.dtype}")
        self._mask = mask

    def _capture_mask(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask")
        if mask is None and args and self._signature is not None:
            try:
                mask = self._signature.bind_partial(*args, **kwargs).arguments.get("attention_mask")
            except TypeError:
                mask = None
        # only a (B, L) padding mask; an additive or 4-D attention mask is not a token mask
        if isinstance(mask, Tensor) and mask.dim() == 2 and not mask.is_floating_point():
            self._forward_mask = mask
        else:
            self._forward_mask = None

    def _release_mask(self, module: nn.Module, args: Any, out: Any) -> None:
        self._forward_mask = None

    def _token_mask(self, x: Tensor, dim: int) -> Tensor | None:
        """The real-token mask (T,) for a layer input ``x`` (..., dim), or None (all tokens real)."""
        mask = self._mask if self._mask is not None else self._forward_mask
        if mask is None:
            return None
        lead = tuple(x.shape[:-1])
        T = x.numel() // dim
        if tuple(mask.shape) == lead or (mask.numel() == T and len(lead) == 1):
            m = mask.reshape(-1)
        elif mask.dim() == 2 and len(lead) == 2 and mask.shape[0] == lead[0] and mask.shape[1] >= lead[1]:
            m = mask[:, mask.shape[1] - lead[1]:].reshape(-1)    # cached tokens first, this forward's last
        elif mask.dim() == 2 and len(lead) == 1 and T % mask.shape[0] == 0 and T // mask.shape[0] <= mask.shape[1]:
            m = mask[:, mask.shape[1] - T // mask.shape[0]:].reshape(-1)     # the same, tokens flattened
        else:
            source = "set_mask" if self._mask is not None else "the model's attention_mask"
            raise ValueError(f"mask: the token mask from {source} has shape {tuple(mask.shape)}, which does not "
                             f"match the {T} tokens of a MoE layer input of shape {tuple(x.shape)}; give one "
                             f"with RoutingMonitor.set_mask")
        return m.to(device=x.device, dtype=torch.bool)

    # ---- hooks ------------------------------------------------------------------------------------
    def _router_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, decision: Any) -> None:
            self._router_call[name] = (args, kwargs, decision)
        return hook

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["x"]
            layer_mask = args[1] if len(args) > 1 else kwargs.get("mask")
            call = self._router_call.pop(name, None)
            real_T = None if layer_mask is not None else self._token_mask(x, module.dim)
            if real_T is None or call is None:
                rec = self._from_metrics(out.metrics)
            else:
                rec = self._real_tokens(module, call, real_T, out.metrics)
            self.records[name].append(rec)
            if self.max_steps is not None and len(self.records[name]) > self.max_steps:
                del self.records[name][0]
        return hook

    @staticmethod
    def _from_metrics(metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        load = metrics.get("tokens_per_expert", metrics.get("slots_per_expert"))
        dropped = metrics["dropped_assignments"]
        return {
            "tokens_per_expert": load,
            "dropped": dropped,
            "total": load.sum() + dropped,            # executed + dropped assignments
            "entropy": metrics["router_entropy"],
        }

    @staticmethod
    def _real_tokens(layer: nn.Module, call: tuple[tuple, dict, Any], real_T: Tensor,
                     metrics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The step's record counted over the real tokens ``real_T`` only, from the routing decision of
        a layer that ran without a mask (the padding took part in routing and in the capacity queues)."""
        args, kwargs, d = call
        E = layer.num_experts
        router_mask = args[1] if len(args) > 1 else kwargs.get("mask_T", kwargs.get("mask"))
        T = d.probs.shape[0]                          # routed tokens: the layer's, then its group padding
        if T < real_T.numel():
            raise ValueError(f"mask: {real_T.numel()} tokens in the mask, the router saw {T}")
        real_T = torch.cat([real_T, real_T.new_zeros(T - real_T.numel())])
        probs_TE = d.probs.detach().float()
        ent_T = -(probs_TE * probs_TE.clamp_min(1e-20).log()).sum(-1)
        n_real = real_T.sum()
        entropy = (ent_T * real_T).sum() / n_real.clamp_min(1)
        if d.kind == "soft":                          # slots mix every token: their count has no padding
            load = metrics["slots_per_expert"]
            dropped = metrics["dropped_assignments"]
            total = load.sum() + dropped
        elif d.kind == "expert_choice":               # the experts' picks of real tokens
            token_A, expert_A, _ = d.assignments()
            keep_A = real_T[token_A]
            load = torch.bincount(expert_A[keep_A], minlength=E)
            dropped = torch.zeros((), device=load.device)
            total = keep_A.sum()
        else:
            ids_TK = d.expert_ids
            K = ids_TK.shape[-1]
            executed_TK = real_T[:, None].expand(T, K)
            keep_TK = _capacity_keep_of(layer, d, router_mask, kwargs.get("group_size"))
            if keep_TK is not None:    # the layer's own queues: the padding it did not know of took places too
                executed_TK = executed_TK & keep_TK
            load = torch.bincount(ids_TK[executed_TK], minlength=E)
            total = n_real * K
            dropped = total - executed_TK.sum()
        return {"tokens_per_expert": load.detach(), "dropped": dropped.detach(), "total": total.detach(),
                "entropy": entropy.detach()}

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def reset(self) -> None:
        for v in self.records.values():
            v.clear()
        self._router_call.clear()

    def __enter__(self) -> "RoutingMonitor":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    # ---- summaries --------------------------------------------------------------------------------
    def load_history(self, layer: str) -> Tensor:
        """(J, E) tokens per expert of each recorded step of ``layer`` (float, CPU)."""
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
            hist_JE = self.load_history(name)
            n = hist_JE.shape[0]
            total_E = hist_JE.sum(0)
            dropped = float(sum(r["dropped"].float().cpu() for r in recs)) if recs else 0.0
            assignments = float(sum(r["total"].float().cpu() for r in recs)) if recs else 0.0
            per_step = hist_JE.max(-1).values / hist_JE.mean(-1).clamp_min(1e-10) if n else torch.zeros(0)
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
            hist_JE = self.load_history(name)
            if hist_JE.shape[0] == 0:
                continue
            share_JE = hist_JE / hist_JE.sum(-1, keepdim=True).clamp_min(1)
            fig, ax = plt.subplots(figsize=(1.5 + 0.3 * hist_JE.shape[1], 1.5 + 0.12 * hist_JE.shape[0]))
            im = ax.imshow(share_JE.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
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
