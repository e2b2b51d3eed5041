"""transformers interop on tiny random models of every supported family: a patched model gives the
original's logits, loss (with transformers' own balancing loss) and parameter gradients within 1e-5 in
float32; ``to_hf(from_hf(block))`` round-trips exactly; the per-expert on-disk layout loads the same
layer; moekit's pooled, padding-masked statistics give transformers' balancing loss.

Legend: B batch, S sequence length, E experts.
"""
import copy

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import moekit.hf as mh  # noqa: E402
from moekit import MoE  # noqa: E402

from .conftest import FAMILY_NAMES, inputs, randomize, tiny_model  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)
# DBRX's tiny model amplifies float32 rounding in its gradients to ~1.5e-5 (its logits and loss stay
# within 1e-5): its gradients are compared in float64, where the two agree to ~1e-14.
FLOAT64_GRADIENTS = {"dbrx"}


def _close_grad(got, want, where):
    """Gradients within 1e-5 of their own scale (float32 rounding grows through the layers' norms)."""
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * scale, msg=lambda m: f"{where}: {m}")


def _blocks(model):
    return [(n, m) for n, m in model.named_modules() if mh.family_of(m) is not None]


def _grads_in_moekit_layout(block):
    """The block's parameter gradients, arranged like its weights in moekit's layout."""
    g = copy.deepcopy(block)
    with torch.no_grad():
        for p_g, p in zip(g.parameters(), block.parameters()):
            p_g.copy_(p.grad if p.grad is not None else torch.zeros_like(p))
    return mh.family_of(block).read(g)


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_patched_model_matches_logits_loss_and_gradients(name):
    torch.set_num_threads(1)
    model = tiny_model(name).train()
    patched = mh.patch(copy.deepcopy(model))
    blocks = _blocks(model)
    assert blocks and not _blocks(patched) and len(mh.patched_blocks(patched)) == len(blocks)
    x = inputs(name, pad=name != "switch_transformers")
    out, out_p = model(**x), patched(**x)
    torch.testing.assert_close(out_p.logits, out.logits, **TOL)
    torch.testing.assert_close(out_p.loss, out.loss, **TOL)
    if getattr(out, "aux_loss", None) is not None:             # transformers' balancing loss carried over
        torch.testing.assert_close(out_p.aux_loss, out.aux_loss, **TOL)
    if name in FLOAT64_GRADIENTS:
        model, patched = model.double(), patched.double()
        x = inputs(name)
        out, out_p = model(**x), patched(**x)
    out.loss.backward()
    out_p.loss.backward()
    moe_names = {n for n, _ in blocks}
    patched_params = dict(patched.named_parameters())
    checked = 0
    for n, p in model.named_parameters():                       # everything outside the MoE blocks
        if any(n.startswith(b + ".") for b in moe_names):
            continue
        if p.grad is not None:
            _close_grad(patched_params[n].grad, p.grad, n)
            checked += 1
    assert checked > 0
    for (n, block), new in zip(blocks, mh.patched_blocks(patched)):   # the MoE blocks, in moekit's layout
        layer_params = dict(new.moe.named_parameters())
        for pname, g in _grads_in_moekit_layout(block).items():
            if pname in layer_params:
                _close_grad(layer_params[pname].grad, g, f"{n}.{pname}")


@pytest.mark.parametrize("name", FAMILY_NAMES)
def test_to_hf_from_hf_round_trips_exactly(name):
    model = tiny_model(name)
    for _, block in _blocks(model):
        layer = mh.from_hf(block)
        assert isinstance(layer, MoE)
        fresh = copy.deepcopy(block)
        randomize(fresh, seed=7)
        mh.to_hf(layer, fresh)
        for (n, a), b in zip(block.state_dict().items(), fresh.state_dict().values()):
            assert torch.equal(a, b), n


def test_wrong_block_and_wrong_layer_raise():
    model = tiny_model("mixtral")
    with pytest.raises(TypeError, match="block"):
        mh.from_hf(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="no MoE block"):
        mh.patch(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    gpt_block = _blocks(tiny_model("gpt_oss"))[0][1]
    with pytest.raises(ValueError, match="layer"):
        mh.to_hf(MoE(16, 8, 4, 2), gpt_block)
    assert len(_blocks(model)) == 2


def test_to_hf_refuses_a_layer_that_routes_differently():
    block = _blocks(tiny_model("mixtral"))[0][1]              # top-2, renormalised
    good = mh.from_hf(block)
    D, H, E = good.dim, good.hidden_dim, good.num_experts
    with pytest.raises(ValueError, match=r"router\.name.*'switch'"):
        mh.to_hf(MoE(D, H, E, router="switch").to(next(block.parameters()).dtype), block)
    with pytest.raises(ValueError, match="router"):
        mh.to_hf(MoE(D, H, E, 2, router="topk").to(next(block.parameters()).dtype), block)
    other_cfg = MoE(D, H, E, 2, router="scored", router_options={"renormalize": False})
    with pytest.raises(ValueError, match="renormalize"):        # weights fit; routing would not
        mh.to_hf(other_cfg.to(next(block.parameters()).dtype), block)
    mh.to_hf(good, block)                                     # the layer from the block itself fits


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_per_expert_disk_layout_loads_the_same_layer(name, tmp_path):
    model = tiny_model(name)
    model.save_pretrained(tmp_path)
    from safetensors import safe_open
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    (block_name, block), = _blocks(model)[:1]
    prefix = next(k for k in keys if ".experts.0." in k).split("experts.0.")[0]
    assert ".experts.0." in next(k for k in keys if k.startswith(prefix + "experts."))   # per-expert on disk
    want = mh.from_hf(block)
    got = mh.from_hf(block)
    for p in got.parameters():
        torch.nn.init.normal_(p)
    mh.load_moe_state_dict(got, tmp_path, prefix)
    for (n, a), b in zip(want.state_dict().items(), got.state_dict().values()):
        assert torch.equal(a, b), n
    with pytest.raises(KeyError, match="prefix"):
        mh.load_moe_state_dict(got, tmp_path, "no.such.prefix.")


def test_balancing_loss_equals_transformers_pooled_and_padding_masked():
    model = tiny_model("mixtral").train()
    patched = mh.patch(copy.deepcopy(model))
    x = inputs("mixtral", pad=True)
    out = model(**x)
    patched(**x)
    got = mh.balancing_loss(patched, x["attention_mask"])
    torch.testing.assert_close(got, out.aux_loss, rtol=1e-6, atol=1e-7)
    # K × moekit's switch loss of the statistics summed over layers (transformers pools the layers)
    total = None
    for b in mh.patched_blocks(patched):
        s = b.last_decision.statistics(x["attention_mask"].reshape(-1).bool())
        total = s if total is None else total + s
    from moekit.losses import switch_loss_from_stats
    torch.testing.assert_close(got, 2 * switch_loss_from_stats(total))
    unmasked = mh.balancing_loss(patched)
    assert not torch.allclose(unmasked, got)


def test_balancing_loss_switch_per_sequence():
    """Switch Transformers averages the loss over sequences (one routing group each)."""
    from transformers.models.switch_transformers.modeling_switch_transformers import load_balancing_loss_func
    model = mh.patch(tiny_model("switch_transformers").train())
    x = inputs("switch_transformers")
    out = model(**x, output_router_logits=True)
    enc = mh.patched_blocks(model.encoder)
    logits = torch.cat([b.last_decision.logits.view(2, -1, 4) for b in enc], dim=1)
    want = load_balancing_loss_func(torch.softmax(logits, -1), logits.argmax(-1))
    torch.testing.assert_close(mh.balancing_loss(model.encoder), want, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.encoder_aux_loss, want, rtol=1e-6, atol=1e-7)


def test_patch_after_a_forward_still_records_router_logits():
    model = tiny_model("qwen3_moe")
    x = inputs("qwen3_moe")
    want = model(**x).aux_loss
    mh.patch(model)                                              # the recorder hooked the old routers already
    torch.testing.assert_close(model(**x).aux_loss, want, **TOL)


def test_upcycle_llama_keeps_logits_at_init():
    import transformers as tf
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    dense = tf.LlamaForCausalLM(cfg)
    randomize(dense, 0)
    x = inputs("llama")
    want = dense(**x).logits
    moe = mh.upcycle(copy.deepcopy(dense), num_experts=4, top_k=2)
    ups = [m for m in moe.modules() if isinstance(m, mh.UpcycledMLP)]
    assert len(ups) == 2 and ups[0].moe.num_experts == 4
    torch.testing.assert_close(moe(**x).logits, want, **TOL)
    assert torch.isfinite(mh.aux_loss(moe))
    noisy = mh.upcycle(copy.deepcopy(dense), 4, 2, noise_std=0.05, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy(**x).logits, want, atol=1e-4)


def test_balancing_loss_of_an_upcycled_model_follows_transformers():
    """An upcycled dense model trains with transformers' loss convention: the same number as
    ``load_balancing_loss_func`` on the new routers' logits."""
    import transformers as tf
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
    cfg = tf.LlamaConfig(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1)
    torch.manual_seed(0)
    model = mh.upcycle(tf.LlamaForCausalLM(cfg), num_experts=4, top_k=2)
    x = inputs("llama", pad=True)
    model(**x)
    logits = tuple(m.last_decision.logits for m in model.modules() if isinstance(m, mh.UpcycledMLP))
    want = load_balancing_loss_func(logits, 4, 2, x["attention_mask"])
    torch.testing.assert_close(mh.balancing_loss(model, x["attention_mask"]), want, rtol=1e-6, atol=1e-7)


def test_inspect_hf_model_example_runs(tmp_path, monkeypatch, capsys):
    import runpy
    from pathlib import Path
    pytest.importorskip("matplotlib")
    example = Path(__file__).resolve().parents[2] / "examples" / "inspect_hf_model.py"
    monkeypatch.setattr("sys.argv", [str(example), str(tmp_path / "report")])
    runpy.run_path(str(example), run_name="__main__")
    out = capsys.readouterr().out
    diff = float(out.split("max |difference| = ")[1].split()[0])
    assert diff <= 1e-5
    assert out.count("| model.layers.") == 4 and "dead experts" in out
    assert (tmp_path / "report" / "report.md").exists() and (tmp_path / "report" / "load_03.png").exists()


def test_to_hf_accepts_other_balancing_loss_coefficients():
    block = _blocks(tiny_model("mixtral"))[0][1]
    layer = mh.from_hf(block)
    trained = MoE.from_config(layer.config.__class__.from_dict(
        {**layer.config.to_dict(), "router": {**layer.config.to_dict()["router"],
                                              "options": {**layer.config.router.options, "w_switch": 0.05}}}))
    trained.load_state_dict(layer.state_dict())
    mh.to_hf(trained.to(next(block.parameters()).dtype), block)     # loss weights shape training only
