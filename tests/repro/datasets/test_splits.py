"""The one stratified split: class shares by hand, disjoint and complete, reproducible, bad fraction refused.

Legend: T examples.
"""
import pytest
import torch

from moekit.repro.datasets.splits import stratified_split


def test_each_class_holds_out_its_rounded_share():
    y_T = torch.tensor([0] * 10 + [1] * 5 + [2] * 3)
    kept, held = stratified_split(y_T, 0.2, torch.Generator().manual_seed(0))
    # round(0.2·10) = 2, round(0.2·5) = 1, round(0.2·3) = 1
    assert torch.bincount(y_T[held], minlength=3).tolist() == [2, 1, 1]
    assert sorted(torch.cat([kept, held]).tolist()) == list(range(18))       # disjoint and complete


def test_same_generator_state_same_split():
    y_T = torch.arange(40) % 4
    a = stratified_split(y_T, 0.25, torch.Generator().manual_seed(3))
    b = stratified_split(y_T, 0.25, torch.Generator().manual_seed(3))
    c = stratified_split(y_T, 0.25, torch.Generator().manual_seed(4))
    assert all(torch.equal(x, z) for x, z in zip(a, b))
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, float("nan")])
def test_fraction_outside_zero_one_is_refused(fraction):
    with pytest.raises(ValueError, match="fraction"):
        stratified_split(torch.arange(10) % 2, fraction, torch.Generator())
