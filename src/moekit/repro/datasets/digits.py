"""scikit-learn's handwritten digits (8×8 images, 10 classes, 1797 examples) as torch tensors.

The data ship with scikit-learn (``sklearn.datasets.load_digits``, the UCI "Optical Recognition of
Handwritten Digits" test set, 16 grey levels), so nothing is downloaded. scikit-learn is part of the
``experiments`` extra.

Legend: T examples, D input features (64 pixels); see the package legend.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .splits import stratified_split

NUM_CLASSES = 10
IMAGE_SIZE = 8


@dataclass
class DigitsSplit:
    """A stratified train/test split. ``x_*`` is ``(T, 64)`` features or ``(T, 1, 8, 8)`` images."""
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mean: float
    std: float


def _load_raw() -> tuple[Tensor, Tensor]:
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data ship with scikit-learn: pip install 'moekit[experiments]'") from e
    d = load_digits()
    return torch.as_tensor(d.data, dtype=torch.float32), torch.as_tensor(d.target, dtype=torch.long)


def load_digits_split(seed: int = 0, test_fraction: float = 0.25, images: bool = False,
                      standardize: bool = True) -> DigitsSplit:
    """Stratified split of the digits, the same for the same ``seed``.

    Pixels are scaled to [0, 1] (÷16); with ``standardize`` they are then shifted/scaled by the
    training set's mean and std (one scalar each, so images keep their spatial structure).
    ``images=True`` returns ``(T, 1, 8, 8)`` tensors for conv nets, otherwise ``(T, 64)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    x_TD, y_T = _load_raw()
    x_TD = x_TD / 16.0
    g = torch.Generator().manual_seed(int(seed))
    tr, te = stratified_split(y_T, test_fraction, g)   # the same test share of every class
    x_tr, x_te = x_TD[tr], x_TD[te]
    mean, std = 0.0, 1.0
    if standardize:
        mean, std = float(x_tr.mean()), float(x_tr.std())
        x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    if images:
        x_tr = x_tr.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
        x_te = x_te.reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    return DigitsSplit(x_tr.contiguous(), y_T[tr], x_te.contiguous(), y_T[te], mean, std)
