"""transformers ↔ moekit: convert MoE blocks, patch whole models, upcycle dense models, and the
transformers-convention balancing loss.

Legend (the package's, ``moekit/__init__.py``): B batch, L sequence length, T = B·L tokens, D model dim,
E experts, K experts per token.
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from .. import losses as L
from ..layers.moe import MoE
from ..config import first_difference
from ..routing import RoutingPlan
from ..stats import RoutingStats
from ..types import MoEOutput
from .families import Family, family_of, fill


def _family(block: nn.Module) -> Family:
    fam = family_of(block)
    if fam is None:
        from .families import FAMILIES
        raise TypeError(f"block: {type(block).__name__} is not the MoE block of a supported transformers family "
                        f"({', '.join(f.name for f in FAMILIES)})")
    return fam


def from_hf(block: nn.Module) -> MoE:
    """A :class:`~moekit.MoE` layer computing what the transformers MoE ``block`` computes, with its
    weights copied (moekit's layout) and its train/eval mode."""
    fam = _family(block)
    layer = fill(fam.build(block), fam.read(block))
    return layer.train(block.training)


def _computed(config: dict) -> dict:
    """A layer configuration without the balancing-loss coefficients (``router.options.w_*``): they
    shape training, not what a block computes."""
    router = dict(config["router"], options={k: v for k, v in config["router"]["options"].items()
                                             if not k.startswith("w_")})
    return dict(config, router=router)


def to_hf(layer: MoE, block: nn.Module) -> nn.Module:
    """Write ``layer``'s weights into the transformers MoE ``block`` (same family and shapes, e.g. the
    block ``layer`` came from or a freshly built one). Returns ``block``.

    The layer must route as the block does: its configuration is compared, as a whole, with the
    configuration of the layer :func:`from_hf` builds for ``block`` (all but the balancing-loss
    coefficients, which only shape training), and a mismatch (e.g. a top-1 ``switch`` layer into a
    top-2 renormalised Mixtral block) raises a ``ValueError`` naming the first field that differs —
    weights that fit are not enough."""
    fam = _family(block)
    if not isinstance(layer, MoE):
        raise TypeError(f"layer: expected a moekit.MoE, got {type(layer).__name__}")
    want, have = _computed(fam.build(block).config.to_dict()), _computed(layer.config.to_dict())
    field = first_difference(want, have)
    if field is not None:
        def at(d):
            for part in field.split("."):
                d = d.get(part, "<missing>") if isinstance(d, dict) else d
            return d
        raise ValueError(f"layer: routes differently from the {fam.name} block: {field} is {at(have)!r}, the "
                         f"block needs {at(want)!r}")
    names = fam.read(block).keys()
    state = dict(layer.named_parameters())
    state.update(dict(layer.named_buffers()))
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"layer: has no {missing} — it is not a {fam.name} layer (build it with from_hf)")
    fam.write(block, {n: state[n].detach() for n in names})
    return block


class _TapBase(nn.Module):
    """Hands the router logits to transformers' output recorder (which hooks modules of the family's
    router class): called with the logits, returns them at the recorder's index."""

    def __init__(self, index: int):
        nn.Module.__init__(self)
        self.index = index

    def forward(self, logits: Tensor):
        return tuple(logits if i == self.index else None for i in range(self.index + 1))

    def extra_repr(self) -> str:
        return f"index={self.index}"


def _tap(fam: Family) -> nn.Module:
    router_cls = fam.cls("router")
    cls = type(f"{router_cls.__name__}LogitsTap", (_TapBase, router_cls), {})
    return cls(fam.tap_index)


class _Tracked(nn.Module):
    """A module around a moekit layer ``self.moe`` that keeps the last forward's output, routing
    decision and routing group size (read by :func:`balancing_loss` and :func:`aux_loss`)."""

    def __init__(self, moe: MoE):
        super().__init__()
        self.moe = moe
        self.last_output: MoEOutput | None = None
        self.last_decision: RoutingPlan | None = None
        self.last_group_size: int | None = None
        moe.router.register_forward_hook(self._keep_decision)

    def _keep_decision(self, module, args, decision):
        self.last_decision = decision

    def _run(self, x: Tensor) -> MoEOutput:
        out = self.moe(x)
        self.last_output = out
        group = self.moe.group_size
        self.last_group_size = x.shape[-2] if group == "sequence" else group
        return out


class PatchedMoEBlock(_Tracked):
    """A transformers MoE block replaced by a moekit layer (``self.moe``), with the block's call
    signature and outputs. The router logits still reach transformers' ``router_logits`` outputs (so
    the model's own balancing loss is unchanged); the last forward's :class:`~moekit.MoEOutput` and
    routing decision stay on ``last_output`` / ``last_decision`` (read by :func:`balancing_loss` and
    :class:`~moekit.analysis.RoutingMonitor`)."""

    def __init__(self, moe: MoE, family: Family, tap_name: str = "router_logits_tap"):
        super().__init__(moe)
        self.family_name = family.name
        self._outputs = family.outputs
        self._per_sequence = family.per_sequence_logits
        self._tap_name = tap_name                  # the original router's name: recorders may filter by path
        setattr(self, tap_name, _tap(family))

    def extra_repr(self) -> str:
        return f"family={self.family_name}"

    def forward(self, hidden_states: Tensor, *args: Any, **kwargs: Any):
        out = self._run(hidden_states)
        logits_TE = self.last_decision.logits
        if self._per_sequence:
            logits = logits_TE.view(*hidden_states.shape[:-1], logits_TE.shape[-1])
        else:
            logits = logits_TE
        getattr(self, self._tap_name)(logits.to(hidden_states.dtype))
        return self._outputs(out.y, self.last_decision, logits_TE)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _hooks_installed(model: nn.Module) -> bool:
    return any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules())


def patch(model: nn.Module) -> nn.Module:
    """Replace, in place, every MoE block of a supported family inside ``model`` by a
    :class:`PatchedMoEBlock` around the equivalent moekit layer; ``model(**inputs)`` keeps working and
    returns the same logits, loss (including transformers' balancing loss) and gradients.
    Returns ``model``."""
    blocks = [(n, m, family_of(m)) for n, m in model.named_modules()]
    blocks = [(n, m, f) for n, m, f in blocks if f is not None]
    if not blocks:
        from .families import FAMILIES
        raise ValueError(f"model: no MoE block of a supported transformers family "
                         f"({', '.join(f.name for f in FAMILIES)})")
    hooked = _hooks_installed(model)
    for name, block, fam in blocks:
        router_cls = fam.cls("router")
        tap_name = next((n for n, c in block.named_children() if isinstance(c, router_cls)), "router_logits_tap")
        new = PatchedMoEBlock(from_hf(block), fam, tap_name)
        if hooked:                       # the recorder hooked the model already: hook the new tap too
            from transformers.utils.output_capturing import install_output_capuring_hook
            install_output_capuring_hook(getattr(new, tap_name), "router_logits", fam.tap_index)
        _replace(model, name, new)
    return model


def patched_blocks(model: nn.Module) -> list[PatchedMoEBlock]:
    return [m for m in model.modules() if isinstance(m, PatchedMoEBlock)]


class UpcycledMLP(_Tracked):
    """A dense MLP turned into a moekit MoE layer (``self.moe``), returning the MLP's output tensor."""

    def forward(self, x: Tensor) -> Tensor:
        return self._run(x).y


def _is_gated_mlp(m: nn.Module) -> bool:
    return all(isinstance(getattr(m, n, None), nn.Linear) for n in ("gate_proj", "up_proj", "down_proj"))


def upcycle(model: nn.Module, num_experts: int, top_k: int, **moe_kwargs) -> nn.Module:
    """Sparse upcycling of a dense transformers model, in place: every gated MLP
    (``gate_proj``/``up_proj``/``down_proj``, e.g. ``LlamaMLP``) becomes an :class:`UpcycledMLP` whose
    experts are copies of it (:meth:`moekit.MoE.from_dense`; ``moe_kwargs`` such as ``noise_std``,
    ``router``, ``capacity_factor`` pass through). With the default renormalised top-k router the
    model's logits are unchanged at initialisation. Returns ``model``; the aux losses of the new layers
    are on ``layer.last_output.aux_loss`` (see :func:`aux_loss`)."""
    targets = [(n, m) for n, m in model.named_modules() if _is_gated_mlp(m)]
    if not targets:
        raise ValueError("model: no gated MLP (gate_proj/up_proj/down_proj) to upcycle")
    for name, mlp in targets:
        _replace(model, name, UpcycledMLP(MoE.from_dense(mlp, num_experts, top_k, **moe_kwargs)))
    return model


def aux_loss(model: nn.Module) -> Tensor:
    """Sum of moekit's weighted aux losses of the last forward over every patched or upcycled layer."""
    outs = [m.last_output for m in model.modules() if isinstance(m, _Tracked)]
    outs = [o for o in outs if o is not None]
    if not outs:
        raise ValueError("model: no patched or upcycled moekit layer has run a forward yet")
    return torch.stack([o.aux_loss for o in outs]).sum()


def balancing_loss(model: nn.Module, attention_mask: Tensor | None = None) -> Tensor:
    """transformers' balancing loss (``load_balancing_loss_func``) of the last forward of a patched
    or upcycled model, from moekit's routing statistics: the statistics of every MoE layer are *pooled* (summed)
    over layers, padding (``attention_mask`` 0) is left out, and the Switch loss of the pooled
    statistics is scaled by top_k:

        ``loss_hf = K · E · Σ_e f_e P_e``  with ``f_e = counts_e / (T·K)``, ``P_e = Σ_x p_e(x) / T``

    over the T real tokens of all layers, i.e. ``K ×`` moekit's ``switch_loss``. Families that route per
    sequence (Switch Transformers) keep one group per sequence and average the groups. Multiply by the
    model's ``router_aux_loss_coef`` as transformers does. Counts are the router's actual selections
    (transformers recounts the top-k of the softmax, which differs for routers with a selection bias).
    """
    blocks = [b for b in model.modules() if isinstance(b, _Tracked) and b.last_decision is not None]
    if not blocks:
        raise ValueError("model: no patched or upcycled MoE layer has run a forward yet (call patch(model) or "
                         "upcycle(model, ...), then the model)")
    total: RoutingStats | None = None
    K = None
    for b in blocks:
        d = b.last_decision
        T = d.logits.shape[0]
        mask_T = None
        if attention_mask is not None:
            if attention_mask.numel() != T:
                raise ValueError(f"attention_mask: {attention_mask.numel()} entries for {T} routed tokens")
            mask_T = attention_mask.reshape(-1).to(device=d.logits.device).bool()
        stats = d.statistics(mask_T, b.last_group_size)
        total = stats if total is None else total + stats
        K = b.moe.top_k
    return K * L.switch_loss_from_stats(total)
