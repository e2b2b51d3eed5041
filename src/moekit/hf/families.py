"""The MoE block of each supported transformers family: how to build the equivalent moekit layer,
and how to move the weights between the two layouts.

Legend (the package's, ``moekit/__init__.py``): E experts, D model dim, H expert hidden dim
(transformers' ``intermediate_size``), T tokens, K experts per token, B batch, L sequence length.

Layouts: transformers keeps the routed experts' fused gate/up weight as (E, 2H, D) for most families
(gate rows first: ``x @ w.T`` then ``chunk(2)``), (E, D, 2H) with interleaved gate/up columns for
GPT-OSS and (E, D, 2H) concatenated for Llama-4; moekit's :class:`~moekit.experts.GLUExperts` keeps
(E, D, 2H) with the gate columns first, ``w_out`` (E, H, D).

Every family here is identified by the transformers classes themselves (``isinstance``), imported
lazily so that moekit works without transformers installed.

Training-time jitter (Mixtral's ``router_jitter_noise``, DBRX's ``moe_jitter_eps``, Switch's
``router_jitter_noise``) carries over as the router's ``jitter``, which perturbs the router input only;
transformers' Mixtral multiplies the block input, so its experts see the jittered input too. With
jitter 0 (the defaults of Mixtral and DBRX) the two are identical in training as well.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import Tensor, nn

from ..layers.moe import MoE


@dataclass
class Family:
    """One transformers MoE block type.

    * ``block`` / ``router``: (module path, class name) of the MoE block and of the router module whose
      output transformers records as ``router_logits`` (``tap_index``: where in that output);
    * ``build(block) -> MoE``: an unfilled moekit layer of the same shape and routing;
    * ``read(block) -> {moekit parameter name: tensor}`` and ``write(block, tensors)``: the weights in
      moekit's layout and back;
    * ``outputs(y, decision, logits)``: what the block's ``forward`` returns (the block output and, for
      some families, routing tensors).
    """
    name: str
    block: tuple[str, str]
    router: tuple[str, str]
    tap_index: int
    build: Callable[[nn.Module], MoE]
    read: Callable[[nn.Module], dict[str, Tensor]]
    write: Callable[[nn.Module, dict[str, Tensor]], None]
    outputs: Callable[[Tensor, Any, Tensor], Any] = field(default=lambda y, d, logits: y)
    per_sequence_logits: bool = False     # router logits recorded as (B, L, E) instead of (B·L, E)

    def cls(self, which: str = "block") -> type | None:
        module, name = self.block if which == "block" else self.router
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            return None


# ---- weight layout helpers ------------------------------------------------------------------------
def _t(w: Tensor) -> Tensor:
    return w.detach().transpose(-1, -2)


def _stacked_glu(experts: nn.Module) -> dict[str, Tensor]:
    """(E, 2H, D) gate_up and (E, D, H) down → moekit w_in (E, D, 2H), w_out (E, H, D)."""
    return {"experts.w_in": _t(experts.gate_up_proj), "experts.w_out": _t(experts.down_proj)}


def _write_stacked_glu(experts: nn.Module, t: dict[str, Tensor]) -> None:
    _copy(experts.gate_up_proj, _t(t["experts.w_in"]))
    _copy(experts.down_proj, _t(t["experts.w_out"]))


def _gated_mlp(mlp: nn.Module, prefix: str = "shared.bank") -> dict[str, Tensor]:
    """A gate_proj/up_proj/down_proj MLP as a one-expert GLU bank."""
    w_in = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], 0).detach().t()[None]
    return {f"{prefix}.w_in": w_in, f"{prefix}.w_out": mlp.down_proj.weight.detach().t()[None]}


def _write_gated_mlp(mlp: nn.Module, t: dict[str, Tensor], prefix: str = "shared.bank") -> None:
    gate_w, up_w = t[f"{prefix}.w_in"][0].t().chunk(2, 0)
    _copy(mlp.gate_proj.weight, gate_w)
    _copy(mlp.up_proj.weight, up_w)
    _copy(mlp.down_proj.weight, t[f"{prefix}.w_out"][0].t())


def _copy(dst: Tensor, src: Tensor) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"weights: shape {tuple(src.shape)} does not fit {tuple(dst.shape)}")
    with torch.no_grad():
        dst.copy_(src)


def fill(layer: MoE, tensors: dict[str, Tensor]) -> MoE:
    """Copy ``{parameter or buffer name: tensor}`` into ``layer`` (every name must exist there)."""
    state = dict(layer.named_parameters())
    state.update(dict(layer.named_buffers()))
    for name, value in tensors.items():
        if name not in state:
            raise KeyError(f"weights: the moekit layer has no parameter {name!r}")
        _copy(state[name], value.to(state[name].dtype))
    return layer


def _like(layer: MoE, block: nn.Module) -> MoE:
    p = next(block.parameters())
    return layer.to(device=p.device, dtype=p.dtype)


# ---- Mixtral-style blocks: gate (E, D) weight + stacked GLU experts --------------------------------
def _act_name(act) -> str:
    """moekit's name of an experts' activation module (compared by value: transformers has its own
    activation classes)."""
    from ..layers.moe import _activation_name
    return _activation_name(act)


def _topk_family(name: str, module: str, block: str, router: str, renormalize: Callable[[nn.Module], bool]) -> Family:
    def router_mod(b):
        return b.gate if hasattr(b, "gate") else b.router

    def build(b):
        c, r = b.experts, router_mod(b)
        layer = MoE(c.hidden_dim, c.intermediate_dim, c.num_experts, r.top_k, router="scored", expert="glu",
                    activation=_act_name(c.act_fn),
                    router_options={"renormalize": renormalize(r), "jitter": float(getattr(b, "jitter_noise", 0.0))})
        return _like(layer, b)

    def read(b):
        return {"router.gate.weight": router_mod(b).weight.detach(), **_stacked_glu(b.experts)}

    def write(b, t):
        _copy(router_mod(b).weight, t["router.gate.weight"])
        _write_stacked_glu(b.experts, t)

    return Family(name, (module, block), (module, router), 0, build, read, write)


_MIX = "transformers.models.mixtral.modeling_mixtral"
_Q3 = "transformers.models.qwen3_moe.modeling_qwen3_moe"
_OLMOE = "transformers.models.olmoe.modeling_olmoe"
_JAMBA = "transformers.models.jamba.modeling_jamba"
_GRANITE = "transformers.models.granitemoe.modeling_granitemoe"

MIXTRAL = _topk_family("mixtral", _MIX, "MixtralSparseMoeBlock", "MixtralTopKRouter", lambda r: True)
QWEN3_MOE = _topk_family("qwen3_moe", _Q3, "Qwen3MoeSparseMoeBlock", "Qwen3MoeTopKRouter",
                         lambda r: bool(r.norm_topk_prob))
OLMOE = _topk_family("olmoe", _OLMOE, "OlmoeSparseMoeBlock", "OlmoeTopKRouter", lambda r: bool(r.norm_topk_prob))
JAMBA = _topk_family("jamba", _JAMBA, "JambaSparseMoeBlock", "JambaTopKRouter", lambda r: False)
MINIMAX = _topk_family("minimax", "transformers.models.minimax.modeling_minimax", "MiniMaxSparseMoeBlock",
                       "MiniMaxTopKRouter", lambda r: True)
FLEX_OLMO = _topk_family("flex_olmo", "transformers.models.flex_olmo.modeling_flex_olmo", "FlexOlmoSparseMoeBlock",
                         "FlexOlmoTopKRouter", lambda r: bool(r.norm_topk_prob))
# Granite-MoE: softmax over the k largest logits == the renormalised top-k of the softmax
GRANITE_MOE = _topk_family("granitemoe", _GRANITE, "GraniteMoeMoE", "GraniteMoeTopKRouter", lambda r: True)


# ---- Qwen2-MoE, Qwen3-Next: + a shared expert with a sigmoid gate ---------------------------------------------
_Q2 = "transformers.models.qwen2_moe.modeling_qwen2_moe"


def _qwen2_build(b):
    c = b.experts
    layer = MoE(c.hidden_dim, c.intermediate_dim, c.num_experts, b.gate.top_k, router="scored", expert="glu",
                activation=_act_name(c.act_fn), router_options={"renormalize": bool(b.gate.norm_topk_prob)},
                num_shared_experts=1, shared_hidden_dim=b.shared_expert.intermediate_size, shared_gate=True)
    return _like(layer, b)


def _qwen2_read(b):
    return {"router.gate.weight": b.gate.weight.detach(), **_stacked_glu(b.experts), **_gated_mlp(b.shared_expert),
            "shared.gate.weight": b.shared_expert_gate.weight.detach()}


def _qwen2_write(b, t):
    _copy(b.gate.weight, t["router.gate.weight"])
    _write_stacked_glu(b.experts, t)
    _write_gated_mlp(b.shared_expert, t)
    _copy(b.shared_expert_gate.weight, t["shared.gate.weight"])


_Q3NEXT = "transformers.models.qwen3_next.modeling_qwen3_next"
QWEN2_MOE = Family("qwen2_moe", (_Q2, "Qwen2MoeSparseMoeBlock"), (_Q2, "Qwen2MoeTopKRouter"), 0,
                   _qwen2_build, _qwen2_read, _qwen2_write)
QWEN3_NEXT = Family("qwen3_next", (_Q3NEXT, "Qwen3NextSparseMoeBlock"), (_Q3NEXT, "Qwen3NextTopKRouter"), 0,
                    _qwen2_build, _qwen2_read, _qwen2_write)


# ---- DeepSeek-V3 / GLM-4-MoE: sigmoid scores, correction bias, group-limited top-k, shared experts ---
def _deepseek_family(name: str, module: str, block: str, router: str) -> Family:
    def build(b):
        g, c = b.gate, b.experts
        shared_h = b.shared_experts.intermediate_size
        layer = MoE(c.hidden_dim, c.intermediate_dim, c.num_experts, g.top_k, router="scored", expert="glu",
                    activation=_act_name(c.act_fn), num_shared_experts=1, shared_hidden_dim=shared_h,
                    router_options={"score": "sigmoid", "selection_bias": True, "n_group": g.num_group,
                                    "topk_group": g.topk_group, "renormalize": bool(g.norm_topk_prob),
                                    "scale": float(g.routed_scaling_factor)})
        return _like(layer, b)

    def read(b):
        return {"router.gate.weight": b.gate.weight.detach(),
                "router.expert_bias": b.gate.e_score_correction_bias.detach(),
                **_stacked_glu(b.experts), **_gated_mlp(b.shared_experts)}

    def write(b, t):
        _copy(b.gate.weight, t["router.gate.weight"])
        _copy(b.gate.e_score_correction_bias, t["router.expert_bias"])
        _write_stacked_glu(b.experts, t)
        _write_gated_mlp(b.shared_experts, t)

    return Family(name, (module, block), (module, router), 0, build, read, write)


_DS3 = "transformers.models.deepseek_v3.modeling_deepseek_v3"
_GLM = "transformers.models.glm4_moe.modeling_glm4_moe"
DEEPSEEK_V3 = _deepseek_family("deepseek_v3", _DS3, "DeepseekV3MoE", "DeepseekV3TopkRouter")
GLM4_MOE = _deepseek_family("glm4_moe", _GLM, "Glm4MoeMoE", "Glm4MoeTopkRouter")


# ---- ERNIE-4.5: softmax scores with a correction bias, optional ungated shared experts -----------------
_ERNIE = "transformers.models.ernie4_5_moe.modeling_ernie4_5_moe"


def _ernie_build(b):
    g, c = b.gate, b.experts
    shared = b.shared_experts
    layer = MoE(c.hidden_dim, c.intermediate_dim, c.num_experts, g.top_k, router="scored", expert="glu",
                activation=_act_name(c.act_fn), num_shared_experts=0 if shared is None else 1,
                shared_hidden_dim=None if shared is None else shared.intermediate_size,
                router_options={"selection_bias": True, "renormalize": True, "norm_min": float(g.norm_min)})
    return _like(layer, b)


def _ernie_read(b):
    t = {"router.gate.weight": b.gate.weight.detach(),
         "router.expert_bias": b.gate.moe_statics.e_score_correction_bias.detach().reshape(-1),
         **_stacked_glu(b.experts)}
    if b.shared_experts is not None:
        t.update(_gated_mlp(b.shared_experts))
    return t


def _ernie_write(b, t):
    _copy(b.gate.weight, t["router.gate.weight"])
    bias = b.gate.moe_statics.e_score_correction_bias
    _copy(bias, t["router.expert_bias"].reshape(bias.shape))
    _write_stacked_glu(b.experts, t)
    if b.shared_experts is not None:
        _write_gated_mlp(b.shared_experts, t)


ERNIE4_5_MOE = Family("ernie4_5_moe", (_ERNIE, "Ernie4_5_MoeSparseMoeBlock"), (_ERNIE, "Ernie4_5_MoeTopKRouter"), 0,
                      _ernie_build, _ernie_read, _ernie_write)


# ---- GPT-OSS: router bias, biased experts, clamped SwiGLU, interleaved gate/up ------------------------
_GPTOSS = "transformers.models.gpt_oss.modeling_gpt_oss"


def _gptoss_build(b):
    r, c = b.router, b.experts
    layer = MoE(c.hidden_size, c.intermediate_size, c.num_experts, r.top_k, router="scored", expert="glu",
                router_options={"bias": True, "renormalize": True},
                expert_options={"bias": True, "alpha": float(c.alpha), "limit": float(c.limit), "up_offset": 1.0})
    return _like(layer, b)


def _deinterleave(w: Tensor) -> Tensor:
    """[..., g0, u0, g1, u1, ...] → [..., g0, g1, ..., u0, u1, ...] along the last dim."""
    return torch.cat([w[..., 0::2], w[..., 1::2]], dim=-1)


def _interleave(w: Tensor) -> Tensor:
    gate, up = w.chunk(2, dim=-1)
    return torch.stack([gate, up], dim=-1).flatten(-2)


def _gptoss_read(b):
    c = b.experts
    return {"router.gate.weight": b.router.weight.detach(), "router.bias": b.router.bias.detach(),
            "experts.w_in": _deinterleave(c.gate_up_proj.detach()),
            "experts.b_in": _deinterleave(c.gate_up_proj_bias.detach()),
            "experts.w_out": c.down_proj.detach(), "experts.b_out": c.down_proj_bias.detach()}


def _gptoss_write(b, t):
    c = b.experts
    _copy(b.router.weight, t["router.gate.weight"])
    _copy(b.router.bias, t["router.bias"])
    _copy(c.gate_up_proj, _interleave(t["experts.w_in"]))
    _copy(c.gate_up_proj_bias, _interleave(t["experts.b_in"]))
    _copy(c.down_proj, t["experts.w_out"])
    _copy(c.down_proj_bias, t["experts.b_out"])


GPT_OSS = Family("gpt_oss", (_GPTOSS, "GptOssMLP"), (_GPTOSS, "GptOssTopKRouter"), 0, _gptoss_build, _gptoss_read,
                 _gptoss_write, outputs=lambda y, d, logits: (y, d.weights.to(y.dtype)))


# ---- Llama-4: sigmoid of the top logit scales the expert *input*; shared expert ----------------------
_LLAMA4 = "transformers.models.llama4.modeling_llama4"


def _llama4_build(b):
    c = b.experts
    layer = MoE(c.hidden_size, c.expert_dim, c.num_experts, b.top_k, router="scored", expert="glu",
                activation=_act_name(c.act_fn), gate_input=True, num_shared_experts=1,
                shared_hidden_dim=b.shared_expert.down_proj.in_features,
                router_options={"score": "sigmoid", "renormalize": False})
    return _like(layer, b)


def _llama4_read(b):
    c = b.experts
    return {"router.gate.weight": b.router.weight.detach(), "experts.w_in": c.gate_up_proj.detach(),
            "experts.w_out": c.down_proj.detach(), **_gated_mlp(b.shared_expert)}


def _llama4_write(b, t):
    _copy(b.router.weight, t["router.gate.weight"])
    _copy(b.experts.gate_up_proj, t["experts.w_in"])
    _copy(b.experts.down_proj, t["experts.w_out"])
    _write_gated_mlp(b.shared_expert, t)


LLAMA4 = Family("llama4", (_LLAMA4, "Llama4TextMoe"), (_LLAMA4, "Llama4Router"), 1, _llama4_build, _llama4_read,
                _llama4_write, outputs=lambda y, d, logits: (y, logits.to(y.dtype)))


# ---- DBRX: (E·H, D) blobs, p-norm weight normalisation ------------------------------------------------
_DBRX = "transformers.models.dbrx.modeling_dbrx"


def _dbrx_build(b):
    m = b.experts.mlp
    p = b.moe_normalize_expert_weights
    layer = MoE(m.hidden_size, m.ffn_hidden_size, m.moe_num_experts, b.top_k, router="scored", expert="glu",
                activation=_act_name(m.activation_fn),
                router_options={"renormalize": False if p is None else float(p),
                                "jitter": float(b.router.moe_jitter_eps or 0.0)})
    return _like(layer, b)


def _dbrx_read(b):
    m = b.experts.mlp
    E, H, D = m.moe_num_experts, m.ffn_hidden_size, m.hidden_size
    w1, v1, w2 = (w.detach().view(E, H, D) for w in (m.w1, m.v1, m.w2))
    return {"router.gate.weight": b.router.layer.weight.detach(),
            "experts.w_in": torch.cat([w1, v1], 1).transpose(1, 2), "experts.w_out": w2}


def _dbrx_write(b, t):
    m = b.experts.mlp
    E, H, D = m.moe_num_experts, m.ffn_hidden_size, m.hidden_size
    w1, v1 = t["experts.w_in"].transpose(1, 2).chunk(2, 1)
    _copy(b.router.layer.weight, t["router.gate.weight"])
    _copy(m.w1, w1.reshape(E * H, D))
    _copy(m.v1, v1.reshape(E * H, D))
    _copy(m.w2, t["experts.w_out"].reshape(E * H, D))


DBRX = Family("dbrx", (_DBRX, "DbrxFFN"), (_DBRX, "DbrxRouter"), 0, _dbrx_build, _dbrx_read, _dbrx_write)


# ---- Switch Transformers: top-1, optional router bias, absolute capacity per sequence, ReLU experts ---
_SWITCH = "transformers.models.switch_transformers.modeling_switch_transformers"


def _switch_build(b):
    r = b.router
    e0 = b.experts["expert_0"]
    layer = MoE(e0.wi.in_features, e0.wi.out_features, r.num_experts, 1, router="scored", expert="mlp",
                activation=_act_name(e0.act), capacity=int(r.expert_capacity), group_size="sequence",
                router_options={"bias": r.classifier.bias is not None, "renormalize": False,
                                "jitter": float(r.jitter_noise or 0.0)})
    return _like(layer, b)


def _switch_read(b):
    E = b.router.num_experts
    ex = [b.experts[f"expert_{e}"] for e in range(E)]
    t = {"router.gate.weight": b.router.classifier.weight.detach(),
         "experts.w1": torch.stack([_t(e.wi.weight) for e in ex]),
         "experts.w2": torch.stack([_t(e.wo.weight) for e in ex])}
    if b.router.classifier.bias is not None:
        t["router.bias"] = b.router.classifier.bias.detach()
    return t


def _switch_write(b, t):
    _copy(b.router.classifier.weight, t["router.gate.weight"])
    if b.router.classifier.bias is not None:
        _copy(b.router.classifier.bias, t["router.bias"])
    for e in range(b.router.num_experts):
        _copy(b.experts[f"expert_{e}"].wi.weight, _t(t["experts.w1"][e]))
        _copy(b.experts[f"expert_{e}"].wo.weight, _t(t["experts.w2"][e]))


SWITCH = Family("switch_transformers", (_SWITCH, "SwitchTransformersSparseMLP"), (_SWITCH, "SwitchTransformersTop1Router"),
                2, _switch_build, _switch_read, _switch_write, per_sequence_logits=True)


FAMILIES: tuple[Family, ...] = (MIXTRAL, QWEN2_MOE, QWEN3_MOE, QWEN3_NEXT, OLMOE, FLEX_OLMO, JAMBA, MINIMAX,
                                GRANITE_MOE, DEEPSEEK_V3, GLM4_MOE, ERNIE4_5_MOE, GPT_OSS, LLAMA4, DBRX, SWITCH)


def family_of(block: nn.Module) -> Family | None:
    """The supported family whose MoE block class ``block`` is an instance of (None if none)."""
    for fam in FAMILIES:
        cls = fam.cls("block")
        if cls is not None and isinstance(block, cls):
            return fam
    return None
