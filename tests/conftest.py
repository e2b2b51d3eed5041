"""Test-wide settings.

The models under test are small: one torch thread is the fastest for them and keeps the results
independent of the machine's core count (thread count can change the order of float reductions).
"""
import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def same_forward_backward():
    """``check(a, b, x, params=True, rtol=1e-5, atol=1e-6, **call_kwargs)``: run two layers on copies
    of ``x``, backpropagate ``y.square().sum() + aux_loss`` through both and assert equal outputs,
    input gradients and (with ``params``) parameter gradients, pairing parameters in order. Returns
    both outputs. The fast-path == reference-path tests share it."""
    def check(a, b, x, *, params=True, rtol=1e-5, atol=1e-6, **call_kwargs):
        x1, x2 = x.detach().clone().requires_grad_(), x.detach().clone().requires_grad_()
        o1, o2 = a(x1, **call_kwargs), b(x2, **call_kwargs)
        torch.testing.assert_close(o1.y, o2.y, rtol=rtol, atol=atol)
        (o1.y.square().sum() + o1.aux_loss).backward()
        (o2.y.square().sum() + o2.aux_loss).backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=10 * rtol, atol=atol)
        if params:
            for (n, p1), p2 in zip(a.named_parameters(), b.parameters()):
                if p1.grad is not None or p2.grad is not None:
                    torch.testing.assert_close(p1.grad, p2.grad, rtol=10 * rtol, atol=atol, msg=lambda m, n=n: f"{n}: {m}")
        return o1, o2
    return check
