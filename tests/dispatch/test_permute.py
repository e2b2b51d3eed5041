"""The atomics-free dispatch pieces: gradchecks in float64, the combine against a scatter-add oracle,
bitwise determinism of the default layer."""
import pytest
import torch

from moekit import MoE
from moekit.dispatch import (Assignments, combine_grid, counts_from_sorted, gather_tokens, invert_permutation,
                             permute_rows)


def _grid(T=7, K=3, E=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids_TK = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    order_R = torch.argsort(ids_TK.t().reshape(-1), stable=True)
    return ids_TK, order_R, invert_permutation(order_R)


def test_invert_and_counts_by_hand():
    order = torch.tensor([2, 0, 3, 1])
    assert invert_permutation(order).tolist() == [1, 3, 0, 2]
    assert counts_from_sorted(torch.tensor([0, 0, 2, 3, 3, 3, 4]), 4).tolist() == [2, 0, 1, 3]   # id 4 ignored


def test_permute_rows_gradcheck():
    _, order, inverse = _grid()
    v = torch.randn(order.numel(), 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: permute_rows(t, order, inverse), (v,))
    assert torch.autograd.gradgradcheck(lambda t: permute_rows(t, order, inverse), (v,))


def test_gather_tokens_gradcheck_and_values():
    T, K = 7, 3
    _, order, inverse = _grid(T, K)
    x = torch.randn(T, 5, dtype=torch.float64, requires_grad=True)
    rows = gather_tokens(x, order, inverse, K)
    torch.testing.assert_close(rows, x[order % T])
    assert torch.autograd.gradcheck(lambda t: gather_tokens(t, order, inverse, K), (x,))
    assert torch.autograd.gradgradcheck(lambda t: gather_tokens(t, order, inverse, K), (x,))


def test_combine_grid_equals_scatter_add():
    T, K = 7, 3
    _, order, inverse = _grid(T, K)
    out = torch.randn(T * K, 5, dtype=torch.float64, requires_grad=True)
    y = combine_grid(out, order, inverse, T, K)
    want = torch.zeros(T, 5, dtype=torch.float64).index_add(0, order % T, out)
    torch.testing.assert_close(y, want)
    assert torch.autograd.gradcheck(lambda t: combine_grid(t, order, inverse, T, K), (out,))


def test_empty_grid():
    ids_TK = torch.zeros(0, 2, dtype=torch.long)
    a = Assignments.from_grid(ids_TK, torch.zeros(0, 2), 4)
    order = torch.argsort(a.expert_A, stable=True)
    x = torch.zeros(0, 3, requires_grad=True)
    y = combine_grid(gather_tokens(x, order, invert_permutation(order), 2), order, invert_permutation(order), 0, 2)
    assert y.shape == (0, 3)


@pytest.mark.parametrize("kw", [{}, dict(capacity_factor=0.5), dict(router="sigmoid", num_shared_experts=1)])
def test_default_layer_is_bitwise_deterministic(kw):
    torch.use_deterministic_algorithms(True)
    try:
        results = []
        for _ in range(2):
            torch.manual_seed(0)
            layer = MoE(16, 32, 8, top_k=2, **kw).train()
            x = torch.randn(64, 16, requires_grad=True)
            out = layer(x)
            (out.y.square().sum() + out.aux_loss).backward()
            results.append([out.y, x.grad] + [p.grad for p in layer.parameters() if p.grad is not None])
        for a, b in zip(*results):
            assert torch.equal(a, b)
    finally:
        torch.use_deterministic_algorithms(False)
