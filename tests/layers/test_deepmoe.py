"""DeepMoE layers: skip path vs dense path, MAC counts by hand, ReLU gate zeros, loss terms, bad arguments.

Legend: B batch, C channels (C_in input, C_out output), H/W height/width, D embedding dim, K classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.layers.deepmoe import (DeepMoEOutput, GatedConv2d, MultiHeadGate, ShallowEmbedding, conv_macs,
                                   deepmoe_aux_loss, embedding_loss, gate_l1)
from moekit.types import MoEOutput


def _gates_with_zeros(B: int, C: int, seed: int = 0) -> torch.Tensor:
    """Pre-activations whose ReLU has channel 1 zero for the whole batch, channel 3 zero for some examples."""
    g = torch.Generator().manual_seed(seed)
    z_BC = torch.rand(B, C, generator=g, dtype=torch.float64) + 0.1
    z_BC[:, 1] = -torch.rand(B, generator=g, dtype=torch.float64)
    z_BC[::2, 3] = -0.5
    return z_BC


@pytest.mark.parametrize("stride,bias", [(1, True), (2, False)])
def test_skip_path_matches_dense_outputs_and_gradients(stride, bias):
    torch.manual_seed(0)
    B, C_in, C_out = 4, 6, 5
    conv = GatedConv2d(C_in, C_out, 3, stride=stride, bias=bias).double()
    if bias:
        torch.nn.init.normal_(conv.bias)
    x = torch.randn(B, C_in, 7, 7, dtype=torch.float64)
    z = _gates_with_zeros(B, C_in)

    def run(train: bool):
        conv.train(train)
        conv.zero_grad()
        xx, zz = x.clone().requires_grad_(), z.clone().requires_grad_()
        out = conv(xx, F.relu(zz))
        (out.y * torch.linspace(-1, 1, out.y.numel(), dtype=torch.float64).view_as(out.y)).sum().backward()
        grads = [xx.grad, zz.grad, conv.weight.grad.clone()] + ([conv.bias.grad.clone()] if bias else [])
        return out, grads

    dense, g_dense = run(True)
    skip, g_skip = run(False)
    assert float(skip.metrics["active_channels"]) == C_in - 1           # channel 1 really sliced out
    assert float(skip.metrics["macs_executed"]) < float(dense.metrics["macs_executed"])
    # reference: the obviously-right conv of the gated input
    ref = F.conv2d(x * F.relu(z)[:, :, None, None], conv.weight.detach(), None if not bias else conv.bias.detach(),
                   stride, 1)
    torch.testing.assert_close(dense.y.detach(), ref)
    torch.testing.assert_close(skip.y.detach(), ref)
    for a, b in zip(g_dense, g_skip):
        torch.testing.assert_close(a, b)
    assert g_skip[2][:, 1].abs().max() == 0      # the skipped channel's kernel gets no gradient


def test_all_channels_skipped_leaves_bias_only():
    conv = GatedConv2d(3, 2, 3, bias=True).eval()
    with torch.no_grad():
        conv.bias.copy_(torch.tensor([0.5, -1.0]))
    out = conv(torch.randn(2, 3, 4, 4), torch.zeros(2, 3))
    assert out.y.shape == (2, 2, 4, 4)
    torch.testing.assert_close(out.y, conv.bias.view(1, 2, 1, 1).expand(2, 2, 4, 4))
    assert float(out.metrics["macs_executed"]) == 0.0 and float(out.metrics["zero_gates"]) == 1.0


def test_mac_counts_by_hand():
    C_in, C_out, k = 4, 3, 3
    conv = GatedConv2d(C_in, C_out, k)
    x = torch.randn(2, C_in, 5, 5)
    gates = torch.tensor([[1.0, 0.0, 2.0, 0.5],
                          [0.3, 0.0, 0.0, 0.7]])     # channel 1 zero for both, channel 2 for the second
    per_channel = C_out * 5 * 5 * k * k              # 675 MACs per input channel per example
    assert conv_macs(C_in, C_out, k, 5, 5) == 4 * per_channel == 2700
    conv.eval()
    m = conv(x, gates).metrics
    assert float(m["macs_dense"]) == 2700
    assert float(m["macs_executed"]) == 3 * per_channel                   # batch-level skip: 3 channels
    assert float(m["macs_ideal"]) == pytest.approx((3 + 2) / 2 * per_channel)
    assert float(m["zero_gates"]) == pytest.approx(3 / 8)
    assert float(m["active_channels"]) == 3
    # per-example skipping == ideal
    ex = [float(conv(x[b:b + 1], gates[b:b + 1]).metrics["macs_executed"]) for b in range(2)]
    assert ex == [3 * per_channel, 2 * per_channel]
    # training mode computes densely
    conv.train()
    assert float(conv(x, gates).metrics["macs_executed"]) == 2700
    # stride 2: 5x5 -> 3x3
    conv2 = GatedConv2d(C_in, C_out, k, stride=2).eval()
    assert float(conv2(x, gates).metrics["macs_dense"]) == C_out * 3 * 3 * C_in * k * k
    # ungated call
    m0 = conv2(x).metrics
    assert float(m0["macs_executed"]) == float(m0["macs_dense"]) == 3 * 9 * 4 * 9


def test_gates_exactly_zero_where_relu_clips():
    gate = MultiHeadGate(3, [2, 4], bias=True, bias_init=0.0)
    with torch.no_grad():
        for head in gate.heads:
            head.weight.copy_(torch.randn(head.weight.shape))
            head.bias.copy_(torch.randn(head.bias.shape))
    e = torch.randn(16, 3)
    gs = gate(e)
    assert [tuple(g.shape) for g in gs] == [(16, 2), (16, 4)]
    for head, g in zip(gate.heads, gs):
        pre = e @ head.weight.T + head.bias
        assert torch.equal(g == 0, pre <= 0)             # exact zeros, exactly where the pre-activation ≤ 0
        torch.testing.assert_close(g[pre > 0], pre[pre > 0])
        assert (pre <= 0).any() and (pre > 0).any()
    # default init: bias 1 and the paper's bias-free form
    assert all(torch.all(h.bias == 1.0) for h in MultiHeadGate(3, [2]).heads)
    assert all(h.bias is None for h in MultiHeadGate(3, [2], bias=False).heads)
    assert gate.macs() == 3 * 6


def test_shallow_embedding_shapes_and_macs():
    emb = ShallowEmbedding(1, embed_dim=32, num_classes=10, channels=(8, 16))
    e, logits = emb(torch.randn(5, 1, 8, 8))
    assert e.shape == (5, 32) and logits.shape == (5, 10)
    assert (e >= 0).all()                                  # ReLU then average pooling
    # by hand: 8x8 -> 4x4 (1->8), -> 2x2 (8->16), -> 1x1 (16->32), classifier 32x10
    assert emb.macs(8, 8) == 16 * 8 * 1 * 9 + 4 * 16 * 8 * 9 + 1 * 32 * 16 * 9 + 32 * 10
    torch.testing.assert_close(logits, emb.classifier(e))


def test_loss_terms_vs_hand_computed():
    g1 = torch.tensor([[1.0, 0.0, 2.0], [0.0, 3.0, 0.0]])
    g2 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    assert float(gate_l1(g1)) == pytest.approx((3 + 3) / 2)
    assert float(gate_l1(g2)) == pytest.approx((1 + 1) / 2)
    logits = torch.tensor([[2.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    labels = torch.tensor([0, 2])
    ce = -0.5 * (math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-1)))
                 + math.log(1 / (2 + math.e)))
    emb = embedding_loss(logits, labels, 0.3)
    assert isinstance(emb, MoEOutput) and emb.y is logits
    assert float(emb.aux_loss) == pytest.approx(0.3 * ce, rel=1e-6)
    assert float(emb.metrics["embedding_ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(emb.metrics["embedding_acc"]) == 0.5
    assert float(embedding_loss(logits, labels, 0.0).aux_loss) == 0.0
    both = deepmoe_aux_loss([g1, g2], logits, labels, l1_weight=0.1, embedding_weight=0.3)
    assert float(both.aux_loss) == pytest.approx(0.1 * (3 + 1) + 0.3 * ce, rel=1e-6)
    assert float(both.metrics["gate_l1"]) == pytest.approx(4.0)
    assert not any(v.requires_grad for v in both.metrics.values())
    # the gated conv's own aux_loss is the weighted λ term, and it has gradient only through the gates
    conv = GatedConv2d(3, 2, 1, l1_weight=0.25)
    gg = g1.clone().requires_grad_()
    out = conv(torch.randn(2, 3, 2, 2), gg)
    assert float(out.aux_loss.detach()) == pytest.approx(0.25 * 3.0)
    assert float(out.metrics["gate_l1"]) == pytest.approx(3.0)
    out.aux_loss.backward()
    torch.testing.assert_close(gg.grad, 0.25 * torch.sign(g1) / 2)
    assert float(GatedConv2d(3, 2, 1)(torch.randn(2, 3, 2, 2), g1).aux_loss) == 0.0   # λ = 0


def test_output_type_fields():
    assert DeepMoEOutput._fields[:3] == MoEOutput._fields[:3]


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="in_channels"):
        GatedConv2d(0, 3)
    with pytest.raises(ValueError, match="l1_weight"):
        GatedConv2d(2, 3, l1_weight=-1.0)
    with pytest.raises(ValueError, match="padding"):
        GatedConv2d(2, 3, padding=-1)
    conv = GatedConv2d(2, 3)
    with pytest.raises(ValueError, match="x"):
        conv(torch.randn(1, 3, 4, 4), torch.ones(1, 3))
    with pytest.raises(ValueError, match="gates"):
        conv(torch.randn(2, 2, 4, 4), torch.ones(1, 2))
    with pytest.raises(TypeError, match="gates"):
        conv(torch.randn(2, 2, 4, 4), [[1.0, 1.0]])
    with pytest.raises(TypeError, match="x"):
        conv([1.0], torch.ones(1, 2))
    with pytest.raises(ValueError, match="channels"):
        MultiHeadGate(4, [])
    with pytest.raises(ValueError, match=r"channels\[1\]"):
        MultiHeadGate(4, [3, 0])
    with pytest.raises(ValueError, match="e"):
        MultiHeadGate(4, [3])(torch.randn(2, 5))
    with pytest.raises(ValueError, match="embed_dim"):
        ShallowEmbedding(1, embed_dim=0)
    with pytest.raises(ValueError, match="x"):
        ShallowEmbedding(1)(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="weight"):
        embedding_loss(torch.randn(2, 3), torch.tensor([0, 1]), -0.1)
    with pytest.raises(ValueError, match="labels"):
        embedding_loss(torch.randn(2, 3), torch.tensor([0, 1, 2]), 0.1)
    with pytest.raises(ValueError, match="gates"):
        deepmoe_aux_loss([], torch.randn(2, 3), torch.tensor([0, 1]), 0.1, 0.1)
