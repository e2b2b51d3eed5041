"""Gradient-accumulation fusion: the backward adds expert weight gradients into an existing ``.grad``.

Oracle: the same steps without fusion (autograd's fresh gradient plus its accumulation), in float64.
"""
import pytest
import torch

from moekit import MoE
from moekit.experts import GLUExperts, MLPExperts
from moekit.experts.grouped_mm import grouped_mm


def _case(counts, D=5, H=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = torch.tensor(counts)
    A = int(counts.sum()) + 2                                     # two padding rows past the counts
    x = torch.randn(A, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.nn.Parameter(torch.randn(len(counts), D, H, generator=g, dtype=torch.float64))
    return x, w, counts


@pytest.mark.parametrize("counts", [[3, 0, 5, 2], [0, 0, 4], [6]])
def test_accumulates_like_autograd_over_three_backwards(counts):
    x, w, c = _case(counts)
    x2, w2 = x.detach().clone().requires_grad_(), torch.nn.Parameter(w.detach().clone())
    for step in range(3):                        # first backward creates .grad, the next two add to it
        dy = torch.randn(x.shape[0], w.shape[-1], dtype=torch.float64, generator=torch.Generator().manual_seed(step))
        (grouped_mm(x, w, c, fuse_grad_accumulation=True) * dy).sum().backward()
        (grouped_mm(x2, w2, c) * dy).sum().backward()
        torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-12)


def test_adds_into_the_existing_gradient_tensor():
    x, w, c = _case([2, 3])
    w.grad = torch.ones_like(w)
    buf = w.grad
    grouped_mm(x, w, c, fuse_grad_accumulation=True).sum().backward()
    assert w.grad is buf                                          # no new tensor: written in place
    x2, w2 = x.detach(), w.detach().clone().requires_grad_()
    grouped_mm(x2, w2, c).sum().backward()
    torch.testing.assert_close(buf, 1 + w2.grad, rtol=1e-12, atol=1e-12)


def test_falls_back_to_autograd_when_the_weight_is_not_a_leaf():
    # e.g. a cast under autocast: the gradient must flow through the cast, so autograd handles it
    x, w, c = _case([2, 3])
    w.grad = torch.zeros_like(w)
    grouped_mm(x, w * 1.0, c, fuse_grad_accumulation=True).sum().backward()
    x2, w2 = x.detach(), w.detach().clone().requires_grad_()
    grouped_mm(x2, w2, c).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_rejects_a_non_bool():
    x, w, c = _case([2, 3])
    with pytest.raises(TypeError, match="fuse_grad_accumulation"):
        grouped_mm(x, w, c, fuse_grad_accumulation=1)
    with pytest.raises(ValueError, match="fuse_grad_accumulation"):
        GLUExperts(2, 4, 6, fuse_grad_accumulation="yes")


@pytest.mark.parametrize("expert", ["glu", "mlp"])
def test_moe_training_with_kept_gradients_matches_unfused(expert):
    # three optimizer steps, each over two accumulated micro-batches, zero_grad(set_to_none=False)
    torch.manual_seed(0)
    fused = MoE(6, 10, 4, top_k=2, expert=expert, expert_options={"fuse_grad_accumulation": True}).double()
    plain = MoE(6, 10, 4, top_k=2, expert=expert).double()
    plain.load_state_dict(fused.state_dict())
    assert fused.experts.fuse_grad_accumulation and not plain.experts.fuse_grad_accumulation
    bank = GLUExperts if expert == "glu" else MLPExperts
    assert isinstance(fused.experts, bank)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (fused, plain)]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        batches = [torch.randn(9, 6, generator=g, dtype=torch.float64) for _ in range(2)]
        for m, opt in zip((fused, plain), opts):
            opt.zero_grad(set_to_none=False)
            for xb in batches:
                out = m(xb)
                (out.y.square().mean() + out.aux_loss).backward()
        for (n, p), q in zip(fused.named_parameters(), plain.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-12, msg=n)
        for opt in opts:
            opt.step()
    for p, q in zip(fused.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
