"""MLP-Mixer and Sparse-MLP: shapes, re-represent dims, MoE_S routing channels (slow references, outputs
and gradients), parameter counts by hand, gradients reach every parameter, argument errors.

Legend: B batch, S tokens, C channels, S1/C1 re-represented tokens/channels, E experts, L classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE
from moekit.repro.models.mixer import MixerBlock, MLPMixer, SparseMixerBlock, count_parameters, sparse_block_indices
from moekit.types import MoEOutput


def _ln(x, norm):
    return F.layer_norm(x, (x.shape[-1],), norm.weight, norm.bias, norm.eps)


def _expert(bank, e, v):
    """Expert e of an MLP bank on one vector: W2ᵀ gelu(W1ᵀ v + b1) + b2."""
    return F.gelu(v @ bank.w1[e] + bank.b1[e]) @ bank.w2[e] + bank.b2[e]


def _moe_one(moe, v):
    """Eval-mode top-1 MoE on one vector: p_e(v) · E_e(v) with e = argmax softmax(v W), p not renormalised."""
    p = torch.softmax(moe.router.gate.weight @ v, dim=0)
    e = int(p.argmax())
    return p[e] * _expert(moe.experts, e, v), e


def _slow_sparse_block(blk, x_BSC):
    """The Sparse-MLP block written out vector by vector (eval mode, top-1)."""
    B, S, C = x_BSC.shape
    h = _ln(x_BSC, blk.norm1)
    out = []
    chosen_s = []
    for b in range(B):
        # re-represent: channels C → C1 (per token), then tokens S → S1 (per channel)
        z_SC1 = h[b] @ blk.channel_in.weight.t() + blk.channel_in.bias
        z_C1S1 = z_SC1.t() @ blk.token_in.weight.t() + blk.token_in.bias
        ys = []
        for c in range(z_C1S1.shape[0]):            # MoE_S: one routed token per channel vector
            y, e = _moe_one(blk.moe_s, z_C1S1[c])
            ys.append(y)
            chosen_s.append(e)
        y_C1S1 = torch.stack(ys)
        y_C1S = y_C1S1 @ blk.token_out.weight.t() + blk.token_out.bias
        y_SC = y_C1S.t() @ blk.channel_out.weight.t() + blk.channel_out.bias
        u_SC = x_BSC[b] + y_SC
        g_SC = _ln(u_SC, blk.norm2)
        out.append(u_SC + torch.stack([_moe_one(blk.moe_c, g_SC[s])[0] for s in range(S)]))   # MoE_C per patch
    return torch.stack(out), chosen_s


def _block(S=4, C=6, E=3, **kw):
    torch.manual_seed(0)
    return SparseMixerBlock(S, C, token_hidden=5, channel_hidden=7, num_experts=E, top_k=1, **kw)


def test_mixer_shapes_and_output_contract():
    torch.manual_seed(0)
    model = MLPMixer(8, 2, 1, 10, dim=8, depth=3, token_hidden=6, channel_hidden=10, sparse_blocks=1, num_experts=4)
    out = model(torch.randn(5, 1, 8, 8))
    assert isinstance(out, MoEOutput) and out.y.shape == (5, 10) and out.aux_loss.shape == ()
    assert model.num_tokens == 16 and model.sparse_indices == (2,)
    assert {k.split("/")[0] for k in out.metrics} == {"block2"}
    assert {"block2/moe_s/cv_load", "block2/moe_c/cv_load", "block2/moe_s/tokens_per_expert",
            "block2/moe_c/dropped_fraction", "block2/moe_s/load_loss"} <= set(out.metrics)
    assert all(not v.requires_grad for v in out.metrics.values())
    # MoE_S routes B·C1 = 5·4 channel vectors, MoE_C routes B·S = 5·16 patches
    assert out.metrics["block2/moe_s/tokens_per_expert"].sum() == 5 * 4
    assert out.metrics["block2/moe_c/tokens_per_expert"].sum() == 5 * 16
    assert list(model.moe_layers()) == ["block2/moe_s", "block2/moe_c"]
    dense = MLPMixer(8, 2, 1, 10, dim=8, depth=3, token_hidden=6, channel_hidden=10)
    d = dense(torch.randn(2, 1, 8, 8))
    assert d.y.shape == (2, 10) and d.metrics == {} and float(d.aux_loss) == 0.0 and d.aux_loss.shape == ()


@pytest.mark.parametrize("patch, tokens", [(4, 49), (7, 16)])
def test_mnist_sized_mixer_tokens_and_routed_counts(patch, tokens):
    # 28×28 images (the sparse-mlp experiment's MNIST): L = (28 / p)² tokens; MoE_S routes B·D1 channel vectors of
    # length L1 = 2L, MoE_C routes B·L patches of length D
    torch.manual_seed(0)
    model = MLPMixer(28, patch, 1, 10, dim=8, depth=2, token_hidden=6, channel_hidden=10, sparse_blocks=1,
                     num_experts=4)
    assert model.num_tokens == tokens
    blk = model.blocks[1]
    assert (blk.moe_tokens, blk.moe_channels) == (2 * tokens, 4) and blk.moe_s.dim == 2 * tokens
    out = model(torch.randn(3, 1, 28, 28))
    assert out.y.shape == (3, 10)
    assert out.metrics["block1/moe_s/tokens_per_expert"].sum() == 3 * 4
    assert out.metrics["block1/moe_c/tokens_per_expert"].sum() == 3 * tokens
    with pytest.raises(ValueError, match="patch_size"):
        MLPMixer(28, 3, 1, 10, dim=8, depth=2, token_hidden=6, channel_hidden=10)


def test_rerepresent_dims():
    blk = _block(S=4, C=6)
    assert (blk.moe_tokens, blk.moe_channels) == (8, 3)                   # S1 = 2S, C1 = C/2
    assert blk.moe_s.dim == 8 and blk.moe_c.dim == 6
    assert (blk.channel_in.in_features, blk.channel_in.out_features) == (6, 3)
    assert (blk.token_in.in_features, blk.token_in.out_features) == (4, 8)
    assert (blk.token_out.in_features, blk.token_out.out_features) == (8, 4)
    assert (blk.channel_out.in_features, blk.channel_out.out_features) == (3, 6)
    x = torch.randn(2, 4, 6)
    z = blk.represent(x)
    assert z.shape == (2, 3, 8)                                           # (B, C1, S1)
    assert blk.unrepresent(z).shape == (2, 4, 6)
    plain = _block(S=4, C=6, rerepresent=False)
    assert plain.moe_s.dim == 4 and plain.represent(x).shape == (2, 6, 4)  # (B, C, S): channels are the tokens
    wide = _block(S=4, C=6, token_expansion=3, channel_reduction=3)
    assert wide.represent(x).shape == (2, 2, 12)


def test_one_expert_equals_dense_token_mlp_over_rerepresented_tokens():
    blk = _block(E=1).eval()
    x = torch.randn(3, 4, 6)
    out = blk(x)
    # by construction: with one expert the gate is softmax over one logit = 1, so MoE_S is one dense MLP applied
    # to each channel vector (length S1) of the re-represented table, MoE_C one MLP per patch
    bs, bc = blk.moe_s.experts, blk.moe_c.experts
    z = blk.represent(_ln(x, blk.norm1))                                   # (B, C1, S1)
    u = x + blk.unrepresent(F.gelu(z @ bs.w1[0] + bs.b1[0]) @ bs.w2[0] + bs.b2[0])
    y = u + F.gelu(_ln(u, blk.norm2) @ bc.w1[0] + bc.b1[0]) @ bc.w2[0] + bc.b2[0]
    torch.testing.assert_close(out.y, y)


def test_sparse_block_matches_slow_reference_outputs_and_gradients():
    blk = _block(E=3).double().eval()
    x = torch.randn(3, 4, 6, dtype=torch.float64, requires_grad=True)
    out = blk(x)
    ref, chosen = _slow_sparse_block(blk, x)
    # the core routers compute logits and gates in float32 whatever the input dtype: float32-level tolerance
    tol = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.y, ref, **tol)
    assert len(set(chosen)) > 1                                # the test routes channel vectors to several experts
    # MoE_S's per-expert counts are counts of channel vectors (B·C1 = 9), and they agree with the reference
    counts = torch.bincount(torch.tensor(chosen), minlength=3).float()
    torch.testing.assert_close(out.metrics["moe_s/tokens_per_expert"], counts)
    w = torch.randn_like(ref)
    params = [p for p in blk.parameters()]
    g_fast = torch.autograd.grad((out.y * w).sum(), [x] + params, allow_unused=True)
    g_ref = torch.autograd.grad((ref * w).sum(), [x] + params, allow_unused=True)
    for (name, _), a, b in zip([("x", None)] + list(blk.named_parameters()), g_fast, g_ref):
        if b is None:
            assert a is None or torch.count_nonzero(a) == 0, name
        else:
            torch.testing.assert_close(a, b, msg=name, **tol)


def test_dense_block_matches_slow_reference():
    torch.manual_seed(1)
    blk = MixerBlock(4, 6, token_hidden=5, channel_hidden=7).double()
    x = torch.randn(2, 4, 6, dtype=torch.float64)
    out = blk(x)
    t, c = blk.token_mlp, blk.channel_mlp
    ref = []
    for b in range(2):
        h = _ln(x[b], blk.norm1)
        # token mixing: the same MLP over the S tokens, once per channel column
        mixed = torch.stack([t.fc2(F.gelu(t.fc1(h[:, j]))) for j in range(6)], dim=1)
        u = x[b] + mixed
        g = _ln(u, blk.norm2)
        ref.append(u + torch.stack([c.fc2(F.gelu(c.fc1(g[s]))) for s in range(4)]))
    torch.testing.assert_close(out.y, torch.stack(ref))
    assert float(out.aux_loss) == 0.0 and out.metrics == {}


def _tiny(top_k=1, sparse_blocks=1):
    return MLPMixer(4, 2, 1, 3, dim=4, depth=2, token_hidden=3, channel_hidden=5, sparse_blocks=sparse_blocks,
                    num_experts=3, top_k=top_k)


def test_parameter_counts_by_hand():
    # image 4×4, patch 2 → S = 4 tokens; C = 4; S1 = 8, C1 = 2; E = 3 MLP experts with biases
    embed = 1 * 2 * 2 * 4 + 4                                        # 20
    dense_block = 2 * 2 * 4 + (4 * 3 + 3 + 3 * 4 + 4) + (4 * 5 + 5 + 5 * 4 + 4)   # LNs 16, token 31, channel 49
    rerep = (4 * 2 + 2) + (4 * 8 + 8) + (8 * 4 + 4) + (2 * 4 + 4)  # C→C1, S→S1, S1→S, C1→C = 98
    expert_s = 8 * 3 + 3 + 3 * 8 + 8                                # 59 (dim S1 = 8, hidden 3)
    expert_c = 4 * 5 + 5 + 5 * 4 + 4                                # 49
    routers = 8 * 3 + 4 * 3                                         # no bias
    sparse_shared = 2 * 2 * 4 + rerep + routers
    head = 2 * 4 + 4 * 3 + 3
    total = embed + dense_block + sparse_shared + 3 * (expert_s + expert_c) + head
    assert total == 613
    assert count_parameters(_tiny()) == {"total": total, "active": total - 2 * (expert_s + expert_c)}
    assert count_parameters(_tiny(top_k=2)) == {"total": total, "active": total - (expert_s + expert_c)}
    dense = _tiny(sparse_blocks=0)
    n = embed + 2 * dense_block + head
    assert count_parameters(dense) == {"total": n, "active": n}
    assert sum(p.numel() for p in _tiny().parameters()) == total       # cross-check against torch


def test_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = MLPMixer(8, 2, 1, 10, dim=8, depth=2, token_hidden=6, channel_hidden=10, sparse_blocks=2,
                     num_experts=3).train()
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    out = model(x)
    for k, v in out.metrics.items():
        if k.endswith("experts_used"):
            assert v == 3, k                       # every expert got tokens in this batch
    (F.cross_entropy(out.y, y) + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.count_nonzero(p.grad) > 0, name


def test_aux_loss_is_the_weighted_importance_and_load_losses():
    torch.manual_seed(0)
    model = MLPMixer(8, 2, 1, 10, dim=8, depth=2, token_hidden=6, channel_hidden=10, sparse_blocks=2,
                     num_experts=4, w_importance=0.01, w_load=0.02).train()
    out = model(torch.randn(8, 1, 8, 8))
    m = out.metrics
    layers = list(model.moe_layers())
    assert len(layers) == 4
    expected = sum(0.01 * m[f"{k}/importance_loss"] + 0.02 * m[f"{k}/load_loss"] for k in layers)
    torch.testing.assert_close(out.aux_loss.detach(), expected)
    assert all(float(m[f"{k}/load_loss"]) > 0 for k in layers) and "block0/moe_s/switch_loss" in m
    moe = model.blocks[0].moe_s
    assert moe.top_k == 1 and moe.router.renormalize is False and math.isclose(moe.router.noise_std, 0.25)
    assert moe.router.w_switch == 0.0


def test_capacity_drops_are_counted_and_settable():
    torch.manual_seed(0)
    model = MLPMixer(8, 2, 1, 10, dim=8, depth=1, token_hidden=6, channel_hidden=10, sparse_blocks=1,
                     num_experts=4, capacity_factor=0.5).eval()
    out = model(torch.randn(8, 1, 8, 8))
    assert float(out.metrics["block0/moe_c/dropped_fraction"]) >= 0.5 - 1e-6   # at c = 0.5 at least half drop
    model.set_capacity_factor(None)
    out = model(torch.randn(8, 1, 8, 8))
    assert float(out.metrics["block0/moe_c/dropped_fraction"]) == 0.0


def test_sparse_block_indices():
    assert sparse_block_indices(2, 6) == (4, 5)
    assert sparse_block_indices(0, 6) == ()
    assert sparse_block_indices("every-2", 6) == (1, 3, 5)
    assert sparse_block_indices([3, 0], 6) == (0, 3)


@pytest.mark.parametrize("kwargs, match", [
    ({"patch_size": 3}, "patch_size"),
    ({"dim": 5, "sparse_blocks": 1}, "channel_reduction"),
    ({"top_k": 5, "sparse_blocks": 1}, "top_k"),
    ({"sparse_blocks": 3}, "sparse_blocks"),
    ({"sparse_blocks": [0, 0]}, "sparse_blocks"),
    ({"sparse_blocks": [2]}, "sparse_blocks"),
    ({"sparse_blocks": "every-3"}, "sparse_blocks"),
    ({"activation": "swish"}, "activation"),
    ({"depth": 0}, "depth"),
    ({"num_experts": 0, "sparse_blocks": 1}, "num_experts"),
    ({"capacity_factor": -1.0, "sparse_blocks": 1}, "capacity"),
])
def test_bad_arguments_raise(kwargs, match):
    base = dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=8, depth=2, token_hidden=4,
                channel_hidden=4, num_experts=4)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        MLPMixer(**base)


def test_bad_inputs_raise():
    model = _tiny()
    with pytest.raises(ValueError, match="x: expected shape"):
        model(torch.randn(2, 1, 8, 8))
    with pytest.raises(TypeError, match="x"):
        model(torch.zeros(2, 1, 4, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="sparse_blocks"):
        sparse_block_indices(True, 4)
    with pytest.raises(TypeError, match="rerepresent"):
        SparseMixerBlock(4, 4, 3, 3, rerepresent=1)
    with pytest.raises(ValueError, match="x: expected shape"):
        _block()(torch.randn(2, 6, 4))
    with pytest.raises(TypeError, match="model"):
        count_parameters("not a model")
    ec = torch.nn.Sequential(MoE(4, 4, 4, router="expert_choice"))
    with pytest.raises(ValueError, match="token-choice"):
        count_parameters(ec)
