"""A frozen English text corpus for byte-level language modelling, with a fixed train/valid/test split.

Legend: T bytes (tokens), B sequences, L sequence length (window length).

``python_docs`` is 1,234,080 bytes (1,232,898 characters, UTF-8) of the Python 3.11.7 documentation: the
79 pydoc help topics (the language reference chapters shipped with CPython as ``pydoc_data.topics``)
followed by de-duplicated docstrings of 131 standard-library modules and their public classes, functions
and methods. It ships frozen as package data (``moekit/repro/datasets/files/python_docs_3.11.7.txt.gz``; the
PSF licence beside it, provenance and the extraction recipe in ``PROVENANCE.md``) and is checked against
its SHA-256 on every load, so every machine and Python version trains on the same bytes::

    corpus = load_corpus()                       # Corpus: bytes of the three splits as uint8 tensors
    x_BL, y_BL = corpus.batch("train", 32, 64, generator)   # random windows, targets shifted by one

The split is contiguous (no window crosses a split boundary): the first 90 % of the bytes train, the
next 5 % validate (docstrings of ``tokenize`` … ``unittest``), the last 5 % test (docstrings of
``unittest.mock`` … ``zipimport``).
"""
from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass
from importlib import resources

import torch
from torch import Tensor

__all__ = ["CORPORA", "Corpus", "load_corpus", "corpus_bytes"]

# name -> (file, SHA-256 of the uncompressed bytes, number of bytes)
CORPORA: dict[str, tuple[str, str, int]] = {
    "python_docs": ("python_docs_3.11.7.txt.gz",
                    "69b912950aaaa665228366c573eccaf8626b12d0e3f4dcdc3ccb71950c77f732", 1_234_080),
}
SPLITS = ("train", "valid", "test")
VOCAB_SIZE = 256     # byte-level: every byte value is a token


def corpus_bytes(name: str = "python_docs") -> bytes:
    """The corpus ``name`` as bytes, verified against its SHA-256 (ValueError if the file was altered)."""
    if name not in CORPORA:
        raise ValueError(f"name: unknown corpus {name!r}; available: {sorted(CORPORA)}")
    file, sha, size = CORPORA[name]
    data = gzip.decompress(resources.files("moekit.repro.datasets").joinpath("files", file).read_bytes())
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != size or digest != sha:
        raise ValueError(f"corpus {name!r}: {file} does not match its checksum (got {len(data)} bytes, "
                         f"sha256 {digest}; expected {size} bytes, sha256 {sha})")
    return data


@dataclass(frozen=True)
class Corpus:
    """The three splits of a byte corpus as uint8 tensors (``train``, ``valid``, ``test``)."""

    name: str
    train: Tensor
    valid: Tensor
    test: Tensor
    vocab_size: int = VOCAB_SIZE

    def split(self, split: str) -> Tensor:
        if split not in SPLITS:
            raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
        return getattr(self, split)

    def batch(self, split: str, batch_size: int, length: int, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """``(x_BL, y_BL)`` int64: ``batch_size`` windows at random offsets, ``y`` = ``x`` shifted by one byte."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        start_B = torch.randint(self.num_starts(split, length), (batch_size,), generator=generator)
        return self.windows_at(split, start_B, length)

    def num_starts(self, split: str, length: int) -> int:
        """How many windows of ``length`` bytes (plus the one target byte after them) fit in the split."""
        data_T = self.split(split)
        if not isinstance(length, int) or length < 1 or length + 1 > data_T.numel():
            raise ValueError(f"length: must be an int in [1, {data_T.numel() - 1}], got {length!r}")
        return data_T.numel() - length

    def windows_at(self, split: str, start_B: Tensor, length: int) -> tuple[Tensor, Tensor]:
        """``(x_BL, y_BL)`` int64: the windows starting at ``start_B``, ``y`` = ``x`` shifted by one byte."""
        n = self.num_starts(split, length)
        in_range = start_B.numel() == 0 or (start_B.min() >= 0 and start_B.max() < n)
        if start_B.dim() != 1 or start_B.is_floating_point() or not in_range:
            raise ValueError(f"start: expected a 1-D integer tensor of offsets in [0, {n}), got {start_B!r}")
        w_BL = self.split(split)[start_B[:, None] + torch.arange(length + 1)].long()
        return w_BL[:, :-1], w_BL[:, 1:]

    def windows(self, split: str, length: int, max_windows: int | None = None) -> tuple[Tensor, Tensor]:
        """Consecutive non-overlapping windows covering the split (for evaluation): ``(x_BL, y_BL)``.

        Every byte after the first is predicted exactly once, from the preceding bytes of its window;
        ``max_windows`` keeps only the first windows (a shorter evaluation).
        """
        data_T = self.split(split)
        if not isinstance(length, int) or length < 1 or length + 1 > data_T.numel():
            raise ValueError(f"length: must be an int in [1, {data_T.numel() - 1}], got {length!r}")
        n = (data_T.numel() - 1) // length
        if max_windows is not None:
            if not isinstance(max_windows, int) or max_windows < 1:
                raise ValueError(f"max_windows: must be a positive int or None, got {max_windows!r}")
            n = min(n, max_windows)
        x_BL = data_T[: n * length].long().view(n, length)
        y_BL = data_T[1: n * length + 1].long().view(n, length)
        return x_BL, y_BL


def load_corpus(name: str = "python_docs", valid_fraction: float = 0.05, test_fraction: float = 0.05) -> Corpus:
    """The corpus split contiguously: train, then ``valid_fraction``, then ``test_fraction`` of the bytes."""
    for arg, v in (("valid_fraction", valid_fraction), ("test_fraction", test_fraction)):
        if not isinstance(v, (int, float)) or not 0.0 < v < 0.5:
            raise ValueError(f"{arg}: must be a number in (0, 0.5), got {v!r}")
    data_T = torch.frombuffer(bytearray(corpus_bytes(name)), dtype=torch.uint8)
    T = data_T.numel()
    n_test, n_valid = int(T * test_fraction), int(T * valid_fraction)
    n_train = T - n_valid - n_test
    return Corpus(name, data_T[:n_train].clone(), data_T[n_train:n_train + n_valid].clone(),
                  data_T[n_train + n_valid:].clone())
