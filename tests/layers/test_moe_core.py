"""The layer's contract beyond equivalence: padding masks, empty batches, dtypes/autocast, the
dispatcher interface and torch.compile (one graph, no host synchronisation)."""
import pytest
import torch

from moekit import MoE
from moekit.dispatch import LocalDispatcher
from moekit.routing import ROUTERS

ALL = sorted(ROUTERS)


def _pair(router, **kw):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=router, w_z=1e-3, **kw).eval()
    if router == "noisy_topk":
        with torch.no_grad():
            layer.router.gate.weight.normal_()
    return layer


@pytest.mark.parametrize("router", ALL)
def test_masked_tokens_are_not_routed_and_count_nowhere(router):
    layer = _pair(router, capacity_factor=0.75 if ROUTERS[router].supports_capacity else None)
    x = torch.randn(20, 8)
    mask = torch.rand(20) > 0.4
    x1 = x.clone().requires_grad_()
    out = layer(x1, mask=mask)
    assert out.y.shape == x.shape and (out.y[~mask] == 0).all()
    sub = layer(x[mask].clone())              # the batch without the padding
    torch.testing.assert_close(out.y[mask], sub.y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.aux_loss, sub.aux_loss, rtol=1e-5, atol=1e-7)
    for k, v in sub.metrics.items():
        torch.testing.assert_close(out.metrics[k], v, rtol=1e-5, atol=1e-6, msg=k)
    out.y.sum().backward()
    assert (x1.grad[~mask] == 0).all()


def test_mask_broadcasts_over_leading_dims():
    layer = _pair("topk")
    x = torch.randn(2, 5, 8)
    lengths = torch.tensor([5, 3])
    mask = torch.arange(5)[None, :] < lengths[:, None]           # (B, L) padding mask
    out = layer(x, mask=mask)
    torch.testing.assert_close(out.y[1, :3], layer(x[1, :3]).y, rtol=1e-5, atol=1e-6)
    assert (out.y[1, 3:] == 0).all()
    with pytest.raises(ValueError, match="mask"):
        layer(x, mask=torch.ones(3, dtype=torch.bool))
    with pytest.raises(TypeError, match="mask"):
        layer(x, mask=torch.ones(2, 5))


@pytest.mark.parametrize("router", ALL)
@pytest.mark.parametrize("case", ["empty", "all_masked"])
def test_empty_and_all_masked_batches(router, case):
    layer = MoE(8, 16, 4, router=router, w_z=1e-3, num_shared_experts=1,
                capacity_factor=1.0 if ROUTERS[router].supports_capacity else None).train()
    x = torch.randn(0, 8) if case == "empty" else torch.randn(6, 8)
    mask = None if case == "empty" else torch.zeros(6, dtype=torch.bool)
    out = layer(x, mask=mask)
    assert out.y.shape == x.shape and (out.y == 0).all()
    assert out.aux_loss.item() == 0.0
    for k, v in out.metrics.items():
        assert torch.isfinite(v).all(), k
    (out.y.sum() + out.aux_loss).backward()


def test_input_dtype_must_match_the_parameters():
    layer = MoE(8, 16, 4)
    for dt in (torch.bfloat16, torch.float16, torch.float64):
        with pytest.raises(TypeError, match=r"x: dtype .* \(torch.float32\)"):
            layer(torch.randn(3, 8, dtype=dt))
    y = layer.double()(torch.randn(3, 8, dtype=torch.float64)).y
    assert y.dtype == torch.float64


@pytest.mark.parametrize("router", ALL)
def test_autocast_bf16_experts_in_bf16_routing_in_fp32(router):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=router, num_shared_experts=1).eval()     # eval: no routing noise
    x = torch.randn(2, 6, 8, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(x)
        d = layer.router(x.reshape(-1, 8))
    assert out.y.dtype == torch.bfloat16
    assert d.logits.dtype == torch.float32 and d.probs.dtype == torch.float32
    ref = layer(x).y
    torch.testing.assert_close(out.y.float(), ref, rtol=0.05, atol=0.05)
    (out.y.float().square().sum() + out.aux_loss).backward()
    assert layer.experts.parameters().__next__().grad.dtype == torch.float32


def test_a_user_dispatcher_plugs_in_without_changing_the_layer():
    class CountingDispatcher(LocalDispatcher):
        def __init__(self):
            self.calls = []

        def dispatch(self, x_TD, a):
            self.calls.append("dispatch")
            return super().dispatch(x_TD, a)

        def combine(self, out_RD, state):
            self.calls.append("combine")
            return super().combine(out_RD, state)

    torch.manual_seed(0)
    disp = CountingDispatcher()
    layer = MoE(8, 16, 4, dispatch=disp).eval()
    ref = MoE(8, 16, 4).eval()
    ref.load_state_dict(layer.state_dict())
    x = torch.randn(10, 8)
    torch.testing.assert_close(layer(x).y, ref(x).y)
    assert disp.calls == ["dispatch", "combine"]
    with pytest.raises(TypeError, match="dispatch"):
        MoE(8, 16, 4, dispatch=object())


@pytest.mark.slow             # torch.compile of forward and backward: 5-8 s per router on 2 cores
@pytest.mark.parametrize("router,kw", [("topk", {}), ("switch", {}), ("noisy_topk", {}),
                                       ("sigmoid", {"num_shared_experts": 1})])
def test_dropless_paths_compile_to_one_graph(router, kw, same_forward_backward):
    torch.manual_seed(0)
    layer = MoE(16, 32, 8, router=router, **kw).train()
    explain = torch._dynamo.explain(layer)(torch.randn(40, 16))
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
    # fullgraph with a dynamic token count (aot_eager backend: tracing forward and backward is what is
    # under test here); eval mode so that compiled and eager draw no different noise
    layer.eval()
    compiled = torch.compile(layer, fullgraph=True, dynamic=True, backend="aot_eager")
    for T in (40, 23, 1):
        same_forward_backward(compiled, layer, torch.randn(T, 16), params=False)
    torch._dynamo.reset()


@pytest.mark.parametrize("router,kw", [("topk", {"capacity_factor": 1.0, "batch_priority": True}),
                                       ("expert_choice", {}), ("soft", {})])
def test_capacity_expert_choice_and_soft_paths_graph_count(router, kw):
    # documented in the README: these also trace to one graph without masks
    layer = MoE(16, 32, 8, router=router, **kw).train()
    explain = torch._dynamo.explain(layer)(torch.randn(2, 20, 16))
    assert explain.graph_count == 1, explain.break_reasons
    torch._dynamo.reset()


@pytest.mark.parametrize("kw", [dict(capacity_factor=0.4), dict(capacity_factor=0.4, batch_priority=True),
                                dict(mask=True), dict(expert="mlp", bias=True, capacity_factor=0.4)])
def test_padding_rows_never_leak_into_outputs_or_gradients(monkeypatch, kw, same_forward_backward):
    # The native grouped matmul leaves rows past the last group undefined; poison them with NaN and
    # check that outputs and every gradient still match the dense oracle.
    import importlib
    gm = importlib.import_module("moekit.experts.grouped_mm")
    real = gm._mm_kernel

    def poisoned(x_AD, w_EDH, counts_E):
        y = real(x_AD, w_EDH, counts_E)
        n = int(counts_E.sum())
        y[n:] = float("nan")
        return y
    monkeypatch.setattr(gm, "_mm_kernel", poisoned)
    kw = dict(kw)
    use_mask = kw.pop("mask", False)
    torch.manual_seed(0)
    fast = MoE(8, 16, 4, top_k=2, **kw).eval()
    ref = MoE(8, 16, 4, top_k=2, dispatch="reference", **kw).eval()
    ref.load_state_dict(fast.state_dict())
    mask = (torch.arange(30) % 3 != 0) if use_mask else None
    same_forward_backward(fast, ref, torch.randn(30, 8), mask=mask)
