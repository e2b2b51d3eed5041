"""CondConv2d / DynamicConv2d: both compute modes vs the explicit mixture Σ_i α_i conv(x, W_i, b_i).

Legend: B batch, C in channels, O out channels, S image side, E experts.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.layers.condconv import (GROUPED_CONV_EFFICIENCY, CondConv2d, CondConvRouter, DynamicConv2d,
                                    anneal_temperature, choose_mode, condconv_reference, mix_kernels_conv2d,
                                    mix_outputs_conv2d, routing_metrics)

MODES = ("mix_kernels", "mix_outputs")


GEOMETRIES = [  # (C, O, kernel, stride, padding, dilation, groups, S)
    (4, 6, 3, 1, 1, 1, 1, 7),
    (4, 6, 3, 2, 1, 1, 2, 7),
    (6, 4, (3, 1), (2, 1), (0, 1), 1, 2, 6),
    (4, 8, 3, 1, 2, 2, 4, 6),
    (3, 5, 1, 1, 0, 1, 1, 4),
]


def _layer(C, O, k, s, p, d, g, E, bias=True, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    return CondConv2d(C, O, k, E, stride=s, padding=p, dilation=d, groups=g, bias=bias, **kw).to(dtype)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("E", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_modes_match_explicit_mixture(geom, E, bias):
    C, O, k, s, p, d, g, S = geom
    layer = _layer(C, O, k, s, p, d, g, E, bias=bias)
    x = torch.randn(5, C, S, S, dtype=torch.float64)
    alpha = layer.route(x)
    assert alpha.shape == (5, E) and bool(((alpha > 0) & (alpha < 1)).all())
    ref = condconv_reference(x, layer.weight, layer.bias, alpha, layer.stride, layer.padding, layer.dilation, g)
    # the reference itself, written out once more for the first example with the mixed kernel
    w0 = sum(alpha[0, i] * layer.weight[i] for i in range(E))
    b0 = None if layer.bias is None else sum(alpha[0, i] * layer.bias[i] for i in range(E))
    torch.testing.assert_close(ref[:1], F.conv2d(x[:1], w0, b0, layer.stride, layer.padding, layer.dilation, g))
    for mode in MODES + ("auto",):
        layer.mode = mode
        y = layer(x)
        assert y.shape == ref.shape == (5, O, *layer.output_size(S))
        torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMETRIES[:3])
def test_gradients_agree_between_modes(geom):
    C, O, k, s, p, d, g, S = geom
    E = 4
    layer = _layer(C, O, k, s, p, d, g, E, own_router=False)
    x0 = torch.randn(3, C, S, S, dtype=torch.float64)
    a0 = torch.rand(3, E, dtype=torch.float64)
    grads = {}
    for mode in MODES + ("reference",):
        layer.zero_grad()
        x, a = x0.clone().requires_grad_(), a0.clone().requires_grad_()
        if mode == "reference":
            y = condconv_reference(x, layer.weight, layer.bias, a, layer.stride, layer.padding, layer.dilation, g)
        else:
            layer.mode = mode
            y = layer(x, routing_weights=a)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)).sum().backward()
        grads[mode] = [x.grad, a.grad, layer.weight.grad.clone(), layer.bias.grad.clone()]
    for mode in MODES:
        for got, want in zip(grads[mode], grads["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", [mix_kernels_conv2d, mix_outputs_conv2d])
def test_gradcheck_float64(fn):
    torch.manual_seed(0)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    a = torch.rand(2, 3, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 6, 2, 3, 3, dtype=torch.float64, requires_grad=True)    # E=3, O=6, groups=2
    b = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: fn(*t, (2, 1), (1, 0), (1, 1), 2), (x, a, w, b))


def test_gradcheck_through_the_router():
    torch.manual_seed(0)
    layer = _layer(2, 4, 3, 1, 1, 1, 1, 3, mode="mix_kernels")
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    layer.mode = "mix_outputs"
    assert torch.autograd.gradcheck(layer, (x,))


@pytest.mark.parametrize("mode", MODES)
def test_one_expert_with_unit_routing_is_conv2d(mode):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2)
    layer = CondConv2d(4, 6, 3, 1, stride=2, padding=1, groups=2, mode=mode, own_router=False)
    with torch.no_grad():
        layer.weight.copy_(conv.weight[None])
        layer.bias.copy_(conv.bias[None])
    x = torch.randn(3, 4, 9, 9)
    torch.testing.assert_close(layer(x, routing_weights=torch.ones(3, 1)), conv(x), rtol=1e-5, atol=1e-6)


def test_experts_initialised_independently_like_conv2d():
    torch.manual_seed(0)
    layer = CondConv2d(8, 16, 3, 4)
    w = layer.weight.detach()
    assert not torch.allclose(w[0], w[1])
    bound = 1.0 / math.sqrt(8 * 9)     # kaiming_uniform(a=√5) on fan_in = C·k²
    assert float(w.abs().max()) <= bound + 1e-7 and float(w.abs().max()) > 0.8 * bound
    assert float(layer.bias.detach().abs().max()) <= bound + 1e-7


def test_shared_routing_across_a_block():
    torch.manual_seed(0)
    router = CondConvRouter(4, 3)
    c1 = CondConv2d(4, 6, 3, 3, padding=1, own_router=False).double()
    c2 = CondConv2d(6, 6, 3, 3, padding=1, own_router=False).double()
    router.double()
    assert c1.router is None and not any("router" in n for n, _ in c1.named_parameters())
    x = torch.randn(4, 4, 5, 5, dtype=torch.float64)
    alpha = router(x)
    # the router by hand: sigmoid(GAP(x) R + c)
    torch.testing.assert_close(alpha, torch.sigmoid(x.mean((2, 3)) @ router.fc.weight.t() + router.fc.bias))
    y = c2(torch.relu(c1(x, routing_weights=alpha)), routing_weights=alpha)
    h = torch.relu(condconv_reference(x, c1.weight, c1.bias, alpha, 1, 1))
    torch.testing.assert_close(y, condconv_reference(h, c2.weight, c2.bias, alpha, 1, 1))
    y.sum().backward()
    assert router.fc.weight.grad is not None and float(router.fc.weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError, match="routing_weights"):
        c1(x)                                     # no own router and no routing weights
    with pytest.raises(ValueError, match="routing_weights"):
        c1(x, routing_weights=alpha[:, :2])
    with pytest.raises(TypeError, match="routing_weights"):
        c1(x, routing_weights=[[1.0, 0.0, 0.0]] * 4)


def test_own_router_overridden_by_routing_weights():
    torch.manual_seed(0)
    layer = CondConv2d(3, 4, 3, 2, padding=1).double()
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    y = layer(x, routing_weights=a)
    torch.testing.assert_close(y[0], F.conv2d(x[:1], layer.weight[0], layer.bias[0], padding=1)[0])
    torch.testing.assert_close(y[1], F.conv2d(x[1:], layer.weight[1], layer.bias[1], padding=1)[0])


def test_empty_batch_and_float32_routing_with_float64_layer():
    layer = _layer(4, 6, 3, 1, 1, 1, 1, 3, mode="mix_kernels")
    y = layer(torch.zeros(0, 4, 5, 5, dtype=torch.float64))
    assert y.shape == (0, 6, 5, 5)
    x = torch.randn(2, 4, 5, 5, dtype=torch.float64)
    y = layer(x, routing_weights=torch.rand(2, 3))
    assert y.dtype == torch.float64


def test_auto_rule():
    # E = 1, batch > 1: one conv either way; mixing outputs avoids the slower grouped conv
    assert choose_mode(1, 64, kernel_madds=16 * 16 * 9, out_channels=16, out_pixels=64) == "mix_outputs"
    # many experts: E convs cost E× the MADDs, the kernel sum is cheap
    assert choose_mode(8, 64, kernel_madds=16 * 16 * 9, out_channels=16, out_pixels=64) == "mix_kernels"
    # batch 1: the grouped conv is an ordinary conv
    assert choose_mode(1, 1, kernel_madds=16 * 16 * 9, out_channels=16, out_pixels=64) == "mix_kernels"
    # the cost formula by hand at the switch: E·W·PQ + E·O·PQ  vs  E·W + W·PQ/η
    W, O, PQ, eta = 144, 16, 64, 0.5
    for E in (1, 2, 3):
        k_cost, o_cost = E * W + W * PQ / eta, E * W * PQ + E * O * PQ
        want = "mix_outputs" if o_cost < k_cost else "mix_kernels"
        assert choose_mode(E, 8, W, O, PQ, grouped_efficiency=eta) == want
    # by hand: E=1: 9216 + 1024 = 10240 < 144 + 18432;  E=2: 18432 + 2048 = 20480 > 288 + 18432 = 18720
    assert choose_mode(1, 8, W, O, PQ, grouped_efficiency=0.5) == "mix_outputs"
    assert choose_mode(2, 8, W, O, PQ, grouped_efficiency=0.5) == "mix_kernels"
    # a slow grouped conv (η = 0.1) moves the switch to more experts: E=4: 36864 + 4096 < 576 + 92160
    assert choose_mode(4, 8, W, O, PQ, grouped_efficiency=0.1) == "mix_outputs"
    assert choose_mode(16, 8, W, O, PQ, grouped_efficiency=0.1) == "mix_kernels"
    assert 0 < GROUPED_CONV_EFFICIENCY <= 1
    layer = CondConv2d(16, 16, 3, 1, padding=1)
    assert layer.resolve_mode(64, 8) == "mix_outputs" and layer.resolve_mode(1, 8) == "mix_kernels"
    layer.mode = "mix_kernels"
    assert layer.resolve_mode(64, 8) == "mix_kernels"
    with pytest.raises(ValueError, match="grouped_efficiency"):
        choose_mode(2, 8, W, O, PQ, grouped_efficiency=0.0)


def test_madds_by_hand():
    layer = CondConv2d(2, 4, 3, 3, padding=1)             # E=3, |W| = 4·2·9 = 72, 5×5 → 5×5 (PQ = 25)
    assert layer.kernel_madds() == 72
    b = layer.madds_breakdown(5)
    assert b == {"router": 2 * 25 + 2 * 3, "mixing": 3 * 72 + 3 * 4, "conv": 72 * 25,
                 "total": 56 + 228 + 1800}
    assert layer.madds(5) == 2084
    assert layer.madds(5, mode="mix_outputs") == 56 + (3 * 4 * 25 + 12) + 3 * 1800
    # stride 2, groups 2, no bias, shared router: |W| = 4·1·9 = 36, 6×6 → 3×3
    layer = CondConv2d(2, 4, 3, 2, stride=2, padding=1, groups=2, bias=False, own_router=False)
    assert layer.output_size(6) == (3, 3)
    assert layer.madds_breakdown(6) == {"router": 0, "mixing": 2 * 36, "conv": 36 * 9, "total": 72 + 324}
    # router with a hidden layer (DynamicConv): GAP + C·R + R·E, R = max(4, 16 // 4) = 4
    r = CondConvRouter(16, 4, routing="softmax", reduction=4)
    assert r.madds((3, 2)) == 16 * 6 + 16 * 4 + 4 * 4
    with pytest.raises(ValueError, match="mode"):
        layer.madds(6, mode="auto")


def test_dynamic_conv_softmax_temperature_and_annealing():
    torch.manual_seed(0)
    layer = DynamicConv2d(8, 8, 3, 4, padding=1).double()
    x = torch.randn(6, 8, 5, 5, dtype=torch.float64) * 3
    assert float(layer.router.temperature) == 30.0
    hot = layer.route(x)
    torch.testing.assert_close(hot.sum(-1), torch.ones(6, dtype=torch.float64))
    layer.set_temperature(0.05)
    cold = layer.route(x)
    z = layer.router.logits(x)
    torch.testing.assert_close(cold, torch.softmax(z / 0.05, -1))
    torch.testing.assert_close(hot, torch.softmax(z / 30.0, -1))
    assert float((hot.max() - hot.min()).detach()) < float((cold.max() - cold.min()).detach())
    layer.mode = "mix_kernels"
    torch.testing.assert_close(layer(x), condconv_reference(x, layer.weight, layer.bias, cold, 1, 1))
    assert "temperature" in dict(layer.named_buffers()).keys() or "router.temperature" in dict(layer.named_buffers())
    # schedule: linear 30 → 1 over `total` steps, then constant
    assert anneal_temperature(0, 10) == 30.0
    assert anneal_temperature(5, 10) == pytest.approx(15.5)
    assert anneal_temperature(10, 10) == 1.0 and anneal_temperature(99, 10) == 1.0
    assert anneal_temperature(3, 0) == 1.0
    assert anneal_temperature(1, 4, start=5.0, end=1.0) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="total"):
        anneal_temperature(0, -1)
    with pytest.raises(ValueError, match="temperature"):
        layer.set_temperature(0.0)
    with pytest.raises(ValueError, match="temperature"):
        CondConv2d(4, 4, 3, 2).set_temperature(2.0)       # sigmoid routing has no temperature
    shared = DynamicConv2d(4, 4, 3, 2, own_router=False)
    with pytest.raises(ValueError, match="temperature"):
        shared.set_temperature(2.0)


def test_routing_metrics():
    a = torch.tensor([[0.5, 0.5], [1.0, 0.0]], requires_grad=True)
    m = routing_metrics(a)
    assert set(m) == {"routing_mean_E", "routing_std_E", "routing_entropy"}
    assert all(not v.requires_grad for v in m.values())
    torch.testing.assert_close(m["routing_mean_E"], torch.tensor([0.75, 0.25]))
    torch.testing.assert_close(m["routing_entropy"], torch.tensor(math.log(2) / 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(mode="fast"), "mode"),
    (dict(groups=3), "groups"),
    (dict(num_experts=0), "num_experts"),
    (dict(kernel_size=0), "kernel_size"),
    (dict(kernel_size=(3, 3, 3)), "kernel_size"),
    (dict(stride=0), "stride"),
    (dict(padding=-1), "padding"),
    (dict(padding="same"), "padding"),
    (dict(dilation=0), "dilation"),
    (dict(routing="relu"), "routing"),
    (dict(routing="sigmoid", temperature=2.0), "temperature"),
    (dict(routing="softmax", temperature=-1.0), "temperature"),
    (dict(own_router=False, routing="relu"), "routing"),
    (dict(router_reduction=0), "router_reduction"),
    (dict(in_channels=0), "in_channels"),
])
def test_bad_arguments_raise(kwargs, match):
    base = dict(in_channels=4, out_channels=8, kernel_size=3, num_experts=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        CondConv2d(**base)


def test_bad_inputs_raise():
    layer = CondConv2d(4, 8, 3, 2)
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(2, 3, 5, 5))
    with pytest.raises(ValueError, match="x"):
        layer(torch.randn(4, 5, 5))
    with pytest.raises(TypeError, match="x"):
        layer(torch.ones(2, 4, 5, 5, dtype=torch.long))
    with pytest.raises(TypeError, match="bias"):
        CondConv2d(4, 8, 3, 2, bias=1)
