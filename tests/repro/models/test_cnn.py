"""CondConvNet: baseline is plain convs, routing per block, modes agree, MADDs by hand, options.

Legend: B batch, E experts, W width.
"""
import pytest
import torch

from moekit.layers.condconv import CondConv2d, condconv_reference
from moekit.repro.models.cnn import CondConvNet


def _conv_madds(c_in, c_out, pixels=64):
    return c_in * c_out * 9 * pixels


def test_one_expert_is_a_plain_cnn_and_madds_by_hand():
    m = CondConvNet(1, width=8)
    assert not any(isinstance(mod, CondConv2d) for mod in m.modules())
    assert m.routing_weights(torch.randn(2, 1, 8, 8)) == []
    W = 8
    convs = [(1, W), (W, W), (W, 2 * W), (2 * W, 2 * W), (2 * W, 4 * W), (4 * W, 4 * W)]
    assert m.madds() == sum(_conv_madds(a, b) for a, b in convs) + 4 * W * 10


def test_condconv_madds_add_routers_and_kernel_sums():
    E, W = 4, 8
    m = CondConvNet(E, width=W)
    base = CondConvNet(1, width=W).madds()
    routers = sum(c * 64 + c * E for c in (W, W, 2 * W))                  # GAP + linear per block
    mixing = E * 9 * sum(a * b for a, b in [(W, W), (W, 2 * W), (2 * W, 2 * W), (2 * W, 4 * W), (4 * W, 4 * W)])
    assert m.madds() == base + routers + mixing                          # bias-free convs: no bias mixing
    convs = 9 * 64 * sum(a * b for a, b in [(W, W), (W, 2 * W), (2 * W, 2 * W), (2 * W, 4 * W), (4 * W, 4 * W)])
    assert m.madds("mix_outputs") == base + routers + (E - 1) * convs + E * 64 * (W + 2 * W + 2 * W + 4 * W + 4 * W)
    # the paper's trend: nearly constant MADDs (here overhead E/64 per layer)
    assert 1.0 < m.madds() / base < 1.1
    with pytest.raises(ValueError, match="mode"):
        m.madds("auto")


def test_strided_net_for_28x28_madds_by_hand():
    # blocks 2 and 3 start with stride 2: maps 28 (stem, block 1) -> 14 (block 2) -> 7 (block 3)
    E, W = 8, 4
    plain = CondConvNet(1, width=W, image_size=28, strides=(1, 2, 2))
    cond = CondConvNet(E, width=W, image_size=28, strides=(1, 2, 2))
    assert [b.output_size(s) for b, s in zip(plain.blocks, (28, 28, 14))] == [28, 14, 7]
    convs = [(1, W, 784), (W, W, 784), (W, 2 * W, 196), (2 * W, 2 * W, 196), (2 * W, 4 * W, 49),
             (4 * W, 4 * W, 49)]
    base = sum(a * b * 9 * p for a, b, p in convs) + 4 * W * 10
    assert plain.madds() == base
    routers = W * 784 + W * E + W * 784 + W * E + 2 * W * 196 + 2 * W * E   # GAP on each block's input + linear
    mixing = E * 9 * sum(a * b for a, b, _ in convs[1:])
    assert cond.madds() == base + routers + mixing
    assert 1.0 < cond.madds() / plain.madds() < 1.1
    x = torch.randn(3, 1, 28, 28)
    logits, alphas = cond.forward_with_routing(x)
    assert logits.shape == (3, 10) and [a.shape for a in alphas] == [(3, E)] * 3
    # the stride really downsamples: the last block's output is 7×7
    h = torch.relu(cond.stem_norm(cond.stem(x)))
    for blk in cond.blocks:
        h, _ = blk(h)
    assert h.shape == (3, 4 * W, 7, 7)


def test_routing_per_block_shared_by_its_layers():
    torch.manual_seed(0)
    m = CondConvNet(3, width=4).double().eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    logits, alphas = m.forward_with_routing(x)
    assert logits.shape == (5, 10) and len(alphas) == m.num_blocks == 3
    assert all(a.shape == (5, 3) and bool(((a > 0) & (a < 1)).all()) for a in alphas)
    # block 2 by hand: router on the block input, the same α for both of its CondConv layers
    h = torch.relu(m.stem_norm(m.stem(x)))
    h, a1 = m.blocks[0](h)
    torch.testing.assert_close(a1, alphas[0])
    blk = m.blocks[1]
    a2 = torch.sigmoid(h.mean((2, 3)) @ blk.router.fc.weight.t() + blk.router.fc.bias)
    torch.testing.assert_close(a2, alphas[1])
    for conv, norm in zip(blk.convs, blk.norms):
        assert conv.router is None
        h = torch.relu(norm(condconv_reference(h, conv.weight, None, a2, 1, 1)))
    torch.testing.assert_close(blk(m.blocks[0](torch.relu(m.stem_norm(m.stem(x))))[0])[0], h)


def test_compute_modes_give_the_same_network():
    torch.manual_seed(0)
    a = CondConvNet(4, width=4, mode="mix_kernels").double()
    b = CondConvNet(4, width=4, mode="mix_outputs").double()
    b.load_state_dict(a.state_dict())
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    ya, yb = a(x), b(x)
    torch.testing.assert_close(ya, yb)
    ya.square().sum().backward()
    yb.square().sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, msg=n)


def test_dynamic_variant_temperature():
    torch.manual_seed(0)
    m = CondConvNet(4, width=4, routing="softmax", temperature=30.0, router_reduction=4)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        hot = m.routing_weights(x)
        m.set_temperature(1.0)
        cold = m.routing_weights(x)
    for h, c in zip(hot, cold):
        torch.testing.assert_close(h.sum(-1), torch.ones(3))
        assert float(h.std()) < float(c.std()) + 1e-6
    assert all(float(b.router.temperature) == 1.0 for b in m.blocks)


def test_trains_a_few_steps():
    torch.manual_seed(0)
    m = CondConvNet(2, width=4)
    x, y = torch.randn(32, 1, 8, 8), torch.randint(0, 10, (32,))
    opt = torch.optim.Adam(m.parameters(), 1e-2)
    losses = []
    for _ in range(15):
        loss = torch.nn.functional.cross_entropy(m(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0]


def test_bad_arguments_and_inputs_raise():
    with pytest.raises(ValueError, match="num_experts"):
        CondConvNet(0)
    with pytest.raises(ValueError, match="width"):
        CondConvNet(2, width=0)
    with pytest.raises(ValueError, match="mode"):
        CondConvNet(2, mode="fast")
    with pytest.raises(ValueError, match="routing"):
        CondConvNet(2, routing="relu")
    with pytest.raises(ValueError, match="dropout"):
        CondConvNet(2, dropout=1.0)
    for strides in ((1, 2), (1, 0, 2), (1, 2.0, 2)):
        with pytest.raises(ValueError, match="strides"):
            CondConvNet(2, strides=strides)
    m = CondConvNet(2, width=4)
    with pytest.raises(ValueError, match="x"):
        m(torch.randn(2, 1, 7, 7))
    with pytest.raises(TypeError, match="x"):
        m(torch.ones(2, 1, 8, 8, dtype=torch.long))
