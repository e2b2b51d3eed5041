"""Tiny random transformers models of every supported MoE family (float32, CPU).

Legend: B batch, S sequence length, V vocabulary, E experts.
"""
from __future__ import annotations

import torch

B, S, V = 2, 7, 61
COMMON = dict(vocab_size=V, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
              output_router_logits=True, router_aux_loss_coef=0.03, pad_token_id=0, tie_word_embeddings=False)


def _configs():
    import transformers as tf
    return {
        "mixtral": (tf.MixtralConfig, tf.MixtralForCausalLM, dict(COMMON, intermediate_size=12, num_local_experts=4,
                                                                   num_experts_per_tok=2)),
        "qwen2_moe": (tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, dict(
            COMMON, intermediate_size=12, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            shared_expert_intermediate_size=12, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[])),
        "qwen3_moe": (tf.Qwen3MoeConfig, tf.Qwen3MoeForCausalLM, dict(
            COMMON, intermediate_size=12, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[])),
        "qwen3_next": (tf.Qwen3NextConfig, tf.Qwen3NextForCausalLM, dict(
            COMMON, intermediate_size=12, head_dim=8, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=8,
            shared_expert_intermediate_size=12, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
            layer_types=["full_attention", "full_attention"])),
        "flex_olmo": (tf.FlexOlmoConfig, tf.FlexOlmoForCausalLM, dict(COMMON, intermediate_size=12, num_experts=4,
                                                                       num_experts_per_tok=2)),
        "minimax": (tf.MiniMaxConfig, tf.MiniMaxForCausalLM, dict(
            COMMON, intermediate_size=12, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention", "full_attention"])),
        "olmoe": (tf.OlmoeConfig, tf.OlmoeForCausalLM, dict(COMMON, intermediate_size=12, num_experts=4,
                                                             num_experts_per_tok=2)),
        "jamba": (tf.JambaConfig, tf.JambaForCausalLM, dict(
            COMMON, intermediate_size=12, num_experts=4, num_experts_per_tok=2, expert_layer_period=1,
            expert_layer_offset=0, attn_layer_period=2, attn_layer_offset=1, mamba_d_state=4, mamba_d_conv=2,
            mamba_expand=2, mamba_dt_rank=4, use_mamba_kernels=False)),
        "granitemoe": (tf.GraniteMoeConfig, tf.GraniteMoeForCausalLM, dict(COMMON, intermediate_size=12,
                                                                            num_local_experts=4, num_experts_per_tok=2)),
        "deepseek_v3": (tf.DeepseekV3Config, tf.DeepseekV3ForCausalLM, dict(
            COMMON, intermediate_size=12, moe_intermediate_size=8, n_routed_experts=8, num_experts_per_tok=2,
            n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=0, routed_scaling_factor=2.5,
            num_key_value_heads=2, kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=4,
            norm_topk_prob=True)),
        "glm4_moe": (tf.Glm4MoeConfig, tf.Glm4MoeForCausalLM, dict(
            COMMON, intermediate_size=12, head_dim=8, moe_intermediate_size=8, n_routed_experts=8,
            num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1, first_k_dense_replace=0,
            routed_scaling_factor=1.5, norm_topk_prob=True)),
        "ernie4_5_moe": (tf.Ernie4_5_MoeConfig, tf.Ernie4_5_MoeForCausalLM, dict(
            COMMON, intermediate_size=12, moe_intermediate_size=8, moe_num_experts=4, moe_k=2,
            moe_num_shared_experts=1, moe_layer_start_index=0, moe_layer_interval=1)),
        "gpt_oss": (tf.GptOssConfig, tf.GptOssForCausalLM, dict(
            COMMON, intermediate_size=8, head_dim=8, num_local_experts=4, num_experts_per_tok=2,
            layer_types=["full_attention", "sliding_attention"], sliding_window=4, swiglu_limit=0.5)),
        "llama4": (tf.Llama4TextConfig, tf.Llama4ForCausalLM, dict(
            COMMON, intermediate_size=8, intermediate_size_mlp=12, head_dim=8, num_local_experts=4,
            num_experts_per_tok=1, interleave_moe_layer_step=1, attention_chunk_size=8)),
        "dbrx": (tf.DbrxConfig, tf.DbrxForCausalLM, dict(
            vocab_size=V, d_model=16, n_heads=2, n_layers=2, max_seq_len=32, output_router_logits=True,
            router_aux_loss_coef=0.03, pad_token_id=0, tie_word_embeddings=False,
            attn_config={"kv_n_heads": 1, "clip_qkv": 2.0},
            ffn_config={"ffn_hidden_size": 8, "moe_num_experts": 4, "moe_top_k": 2, "moe_jitter_eps": None,
                        "moe_normalize_expert_weights": 2.0})),
        "switch_transformers": (tf.SwitchTransformersConfig, tf.SwitchTransformersForConditionalGeneration, dict(
            vocab_size=V, d_model=16, d_ff=12, d_kv=8, num_heads=2, num_layers=2, num_decoder_layers=2,
            num_sparse_encoder_layers=1, num_sparse_decoder_layers=1, num_experts=4, expert_capacity=3,
            router_bias=True, router_jitter_noise=0.0, dropout_rate=0.0, pad_token_id=0,
            decoder_start_token_id=0, router_z_loss_coef=0.001, router_aux_loss_coef=0.03)),
    }


FAMILY_NAMES = ["mixtral", "qwen2_moe", "qwen3_moe", "qwen3_next", "olmoe", "flex_olmo", "jamba", "minimax", "granitemoe",
                "deepseek_v3", "glm4_moe", "ernie4_5_moe", "gpt_oss", "llama4", "dbrx", "switch_transformers"]


def randomize(module: torch.nn.Module, seed: int, std: float = 0.2) -> None:
    """Random weights everywhere (no ties between routers' scores) and random correction biases."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (std if p.dim() > 1 else 0.1) + (1.0 if "norm" in name else 0.0))
        for name, buf in module.named_buffers():
            if "e_score_correction_bias" in name:
                buf.copy_(torch.randn(buf.shape, generator=g) * 0.1)


def tiny_model(name: str, seed: int = 0):
    cfg_cls, model_cls, kw = _configs()[name]
    torch.manual_seed(seed)
    cfg = cfg_cls(**kw)
    cfg._attn_implementation = "eager"
    if name == "dbrx":       # transformers 5.23's DbrxAttention reads rope_theta from a sub-config that lacks it
        cfg.attn_config.rope_theta = 10000.0
    model = model_cls(cfg)
    # DBRX's tiny random model amplifies float32 rounding (clamped qkv, large residual): smaller weights
    # keep it near 1e-6 (in float64 patched and original agree to 1e-14 either way)
    randomize(model, seed, std=0.1 if name == "dbrx" else 0.2)
    return model.float()


def inputs(name: str, seed: int = 0, pad: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    if pad:
        mask[1, :3] = 0                                # left padding in the second row
    out = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    if name == "switch_transformers":
        out["decoder_input_ids"] = torch.randint(1, V, (B, S), generator=g)
        out["labels"] = torch.randint(1, V, (B, S), generator=g)
    return out
