"""The grouped matmul (our autograd around torch's grouped_mm and the padded fallback) vs a loop."""
import pytest
import torch

from moekit.experts.grouped_mm import grouped_mm, grouped_mm_reference, native_supported


def _case(counts, D=8, H=12, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    x = torch.randn(int(counts.sum()), D, generator=g, dtype=dtype, requires_grad=True)
    w = torch.randn(len(counts), D, H, generator=g, dtype=dtype, requires_grad=True)
    return x, w, counts


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [7], [0, 0, 4], [1, 1, 1, 1, 1]])
@pytest.mark.parametrize("D,H", [(8, 12), (5, 7)])   # 5, 7: not 16-byte aligned -> padded fallback
def test_matches_reference_loop_outputs_and_grads(counts, D, H):
    x, w, c = _case(counts, D, H)
    y = grouped_mm(x, w, c)
    dy = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), dy)
    x2, w2 = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    y2 = grouped_mm_reference(x2, w2, c)
    gx2, gw2 = torch.autograd.grad(y2, (x2, w2), dy)
    torch.testing.assert_close(y, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gx, gx2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gw, gw2, rtol=1e-5, atol=1e-5)


def test_native_kernel_is_used_for_aligned_float32():
    x, w, _ = _case([2, 2], D=8, H=12)
    assert native_supported(x, w)
    x, w, _ = _case([2, 2], D=5, H=12)
    assert not native_supported(x, w)
    x, w, _ = _case([2, 2], dtype=torch.float64)
    assert not native_supported(x, w)


def test_expanded_gradient_is_handled():
    # torch's own grouped_mm backward fails on the expanded gradient of .sum(); ours makes it dense.
    x, w, c = _case([3, 1, 4])
    grouped_mm(x, w, c).sum().backward()
    ref_x = x.detach().clone().requires_grad_()
    grouped_mm_reference(ref_x, w.detach(), c).sum().backward()
    torch.testing.assert_close(x.grad, ref_x.grad)


def test_gradcheck_float64():
    x, w, c = _case([2, 0, 3, 1], D=3, H=4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: grouped_mm(a, b, c), (x, w))


def test_bfloat16_close_to_float32():
    x, w, c = _case([5, 3, 8], D=16, H=16)
    y32 = grouped_mm(x, w, c)
    y16 = grouped_mm(x.bfloat16(), w.bfloat16(), c)
    assert y16.dtype == torch.bfloat16
    torch.testing.assert_close(y16.float(), y32, rtol=3e-2, atol=1e-1)


def test_bad_shapes():
    x, w, c = _case([2, 2])
    with pytest.raises(ValueError, match="counts"):
        grouped_mm(x, w, torch.tensor([4]))
    with pytest.raises(ValueError, match="grouped_mm"):
        grouped_mm(x[:, :3], w, c)


@pytest.mark.parametrize("act", ["silu", "gelu", "identity", "relu", "tanh"])
def test_fused_glu_gradcheck_and_matches_autograd(act):
    from moekit.experts.bank import ACTIVATIONS, glu
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: glu(t, act), (h,))
    h0 = h.detach().clone()
    y = glu(h, act)
    torch.testing.assert_close(h.detach(), h0, rtol=0, atol=0)      # the input is never written to
    ref = ACTIVATIONS[act](h0[:, :3]) * h0[:, 3:]
    torch.testing.assert_close(y, ref)
