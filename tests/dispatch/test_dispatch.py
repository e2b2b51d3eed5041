"""Fast dispatch vs the dense reference oracle, and the capacity rule worked by hand."""
import pytest
import torch

from moekit import MoE
from moekit.dispatch import Assignments, LocalDispatcher, ReferenceDispatcher, capacity_mask, expert_capacity
from moekit.experts import GLUExperts, MLPExperts


def test_capacity_formula():
    assert expert_capacity(10, 2, 4, 1.0) == 5          # ceil(10*2*1/4)
    assert expert_capacity(10, 2, 4, 0.25) == 2         # ceil(1.25)
    assert expert_capacity(1, 1, 64, 0.5) == 1          # at least one slot
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_capacity(10, 2, 4, 0)


def test_capacity_mask_slot_major_by_hand():
    # E = 3, C = 2. Service order: all first choices (t0..t3), then all second choices.
    # slot 0: t0->e0 (1st), t1->e0 (2nd), t2->e0 (3rd: drop), t3->e1 (1st)
    # slot 1: t0->e1 (2nd), t1->e2 (1st), t2->e1 (3rd: drop), t3->e0 (3rd: drop)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_mask(ids, 3, 2)
    assert keep.tolist() == [[True, True], [True, True], [False, False], [True, False]]


def test_capacity_mask_batch_priority_by_hand():
    # priority [0.1, 0.9, 0.8, 0.5] -> service order t1, t2, t3, t0 in each slot.
    # slot 0: t1->e0 (1st), t2->e0 (2nd), t3->e1 (1st), t0->e0 (3rd: drop)
    # slot 1: t1->e2 (1st), t2->e1 (2nd), t3->e0 (3rd: drop), t0->e1 (3rd: drop)
    ids = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 0]])
    keep = capacity_mask(ids, 3, 2, priority_T=torch.tensor([0.1, 0.9, 0.8, 0.5]))
    assert keep.tolist() == [[False, False], [True, True], [True, True], [True, False]]


@pytest.mark.parametrize("bank", [MLPExperts, GLUExperts])
def test_sorted_equals_reference_outputs_and_grads(bank):
    torch.manual_seed(0)
    experts = bank(5, 8, 12)
    T, K = 13, 2
    x = torch.randn(T, 8, requires_grad=True)
    ids = torch.stack([torch.randint(0, 4, (T,)), torch.full((T,), 4)], 1)   # expert 4 gets all 2nd slots
    w = torch.rand(T, K, requires_grad=True)
    grid = Assignments.from_grid(ids, w, 5)
    flat = Assignments(grid.token_A, grid.expert_A, grid.weight_A, T, 5)      # the same, not as a grid
    y1 = LocalDispatcher()(x, grid, experts)
    g1 = torch.autograd.grad(y1.square().sum(), [x, w] + list(experts.parameters()))
    y3 = LocalDispatcher()(x, flat, experts)
    g3 = torch.autograd.grad(y3.square().sum(), [x, w] + list(experts.parameters()))
    y2 = ReferenceDispatcher()(x, grid, experts)
    g2 = torch.autograd.grad(y2.square().sum(), [x, w] + list(experts.parameters()))
    torch.testing.assert_close(y1, y2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(y3, y2, rtol=1e-5, atol=1e-5)
    for a, b, c in zip(g1, g2, g3):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(c, b, rtol=1e-4, atol=1e-5)


def _pair(**kw):
    torch.manual_seed(1)
    fast = MoE(8, 16, 6, dispatch="sorted", **kw)
    ref = MoE(8, 16, 6, dispatch="reference", **kw)
    ref.load_state_dict(fast.state_dict())
    return fast.eval(), ref.eval()


@pytest.mark.parametrize("kw", [
    dict(router="topk", top_k=2), dict(router="switch"), dict(router="noisy_topk", top_k=3),
    dict(router="topk", top_k=2, capacity_factor=0.5), dict(router="topk", top_k=2, capacity_factor=0.5,
                                                               batch_priority=True),
    dict(router="expert_choice"), dict(router="softmax"), dict(router="sigmoid"), dict(router="soft"),
    dict(router="topk", expert="mlp", num_shared_experts=1),
])
def test_layer_fast_equals_reference(kw, same_forward_backward):
    fast, ref = _pair(**kw)
    o1, o2 = same_forward_backward(fast, ref, torch.randn(3, 7, 8), atol=1e-5)
    key = "slots_per_expert" if fast.kind == "soft" else "tokens_per_expert"
    torch.testing.assert_close(o1.metrics[key], o2.metrics[key])


def test_capacity_large_enough_equals_dropless():
    torch.manual_seed(2)
    dropless = MoE(8, 16, 4, top_k=2).eval()
    capped = MoE(8, 16, 4, top_k=2, capacity_factor=4.0).eval()   # C = T*k: nothing can overflow
    capped.load_state_dict(dropless.state_dict())
    x = torch.randn(21, 8)
    a, b = dropless(x), capped(x)
    torch.testing.assert_close(a.y, b.y)
    assert b.metrics["dropped_assignments"].item() == 0


def test_dropped_slots_are_counted_and_contribute_zero():
    torch.manual_seed(3)
    layer = MoE(8, 16, 4, top_k=1, capacity_factor=0.25).eval()   # C = ceil(T/16)
    x = torch.randn(32, 8)
    out = layer(x)
    C = expert_capacity(32, 1, 4, 0.25)
    assert out.metrics["tokens_per_expert"].max().item() <= C
    dropped = out.metrics["dropped_assignments"].item()
    assert dropped == 32 - out.metrics["tokens_per_expert"].sum().item() > 0
    assert out.metrics["dropped_fraction"].item() == pytest.approx(dropped / 32)
    zero_rows = (out.y.abs().sum(-1) == 0).sum().item()
    assert zero_rows == dropped


def test_batch_priority_keeps_the_most_confident_tokens():
    torch.manual_seed(4)
    layer = MoE(8, 16, 4, top_k=1, capacity_factor=0.5, batch_priority=True).eval()
    x = torch.randn(64, 8)
    out = layer(x)
    d = layer.router(x)
    top_T = d.weights[:, 0]
    kept_T = out.y.abs().sum(-1) > 0
    for e in range(4):   # within each expert, every kept token is at least as confident as every dropped one
        sel = d.expert_ids[:, 0] == e
        if (sel & ~kept_T).any() and (sel & kept_T).any():
            assert top_T[sel & kept_T].min() >= top_T[sel & ~kept_T].max()
