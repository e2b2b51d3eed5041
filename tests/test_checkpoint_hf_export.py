"""moekit.hf.save_pretrained: a patched (and trained) model of every supported family written in its
family's own transformers layout; plain transformers' from_pretrained loads it with equal logits."""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import moekit.hf as mh  # noqa: E402
from hf.conftest import FAMILY_NAMES, inputs, tiny_model  # noqa: E402


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_export_loads_in_plain_transformers_with_equal_logits(name, tmp_path):
    model = tiny_model(name).eval()
    patched = mh.patch(copy.deepcopy(model)).eval()
    with torch.no_grad():                         # a "trained" model: every MoE weight moved
        for block in mh.patched_blocks(patched):
            for p in block.moe.parameters():
                p.add_(0.01 * torch.randn_like(p))
    mh.save_pretrained(patched, tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded.eval()
    x = inputs(name)
    if name == "dbrx":      # its tiny model amplifies float32 rounding (see tests/hf): compare in float64
        model, patched, loaded = model.double(), patched.double(), loaded.double()
    with torch.no_grad():
        want, got = patched(**x).logits, loaded(**x).logits
        before = model(**x).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(before, want)      # the export carries the changed weights


def test_tied_embeddings(tmp_path):
    import transformers as tf
    cfg = tf.Qwen3MoeConfig(vocab_size=61, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                            num_key_value_heads=1, intermediate_size=12, head_dim=8, num_experts=4,
                            num_experts_per_tok=2, moe_intermediate_size=8, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = tf.Qwen3MoeForCausalLM(cfg).eval()
    patched = mh.patch(copy.deepcopy(model)).eval()
    mh.save_pretrained(patched, tmp_path)
    loaded, info = tf.Qwen3MoeForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(1, 61, (2, 5))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, patched(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_an_unpatched_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model: has no patched MoE block"):
        mh.save_pretrained(tiny_model("mixtral"), tmp_path)
