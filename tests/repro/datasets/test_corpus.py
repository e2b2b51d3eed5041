"""The frozen byte corpus: checksum, size, split, batches and evaluation windows.

Legend: N bytes, B sequences, L window length.
"""
import gzip
import hashlib
from importlib import resources

import pytest
import torch

from moekit.repro.datasets import corpus as C
from moekit.repro.datasets.corpus import CORPORA, corpus_bytes, load_corpus


@pytest.fixture(scope="module")
def docs():
    return load_corpus()


def test_bytes_match_the_recorded_checksum_and_size():
    data = corpus_bytes()
    file, sha, size = CORPORA["python_docs"]
    assert len(data) == size >= 1_000_000
    assert hashlib.sha256(data).hexdigest() == sha
    # the file is the gzip of exactly these bytes, and they are UTF-8 English prose with code samples
    raw = resources.files("moekit.repro.datasets").joinpath("files", file).read_bytes()
    assert gzip.decompress(raw) == data
    text = data.decode("utf-8")
    assert len(text) > 1_200_000
    assert text.startswith('The "assert" statement\n')
    assert text.count(" the ") > 8_000


def test_altered_file_is_refused(monkeypatch):
    file, sha, size = CORPORA["python_docs"]
    monkeypatch.setitem(C.CORPORA, "python_docs", (file, "0" * 64, size))
    with pytest.raises(ValueError, match="checksum"):
        corpus_bytes()
    with pytest.raises(ValueError, match="name"):
        corpus_bytes("no-such-corpus")


def test_split_is_contiguous_90_5_5(docs):
    data = corpus_bytes()
    N = len(data)
    assert docs.valid.numel() == docs.test.numel() == int(N * 0.05)
    assert docs.train.numel() + docs.valid.numel() + docs.test.numel() == N
    joined = torch.cat([docs.train, docs.valid, docs.test])
    assert bytes(joined.tolist()) == data
    assert docs.train.dtype == torch.uint8 and docs.vocab_size == 256


def test_batches_are_shifted_windows_of_the_split(docs):
    g = torch.Generator().manual_seed(0)
    x, y = docs.batch("train", 4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    tr = bytes(docs.train.tolist())
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        assert bytes(row_x + row_y[-1:]) in tr
    # same generator state -> same batch; different seeds -> different batches
    x2, _ = docs.batch("train", 4, 16, torch.Generator().manual_seed(0))
    x3, _ = docs.batch("train", 4, 16, torch.Generator().manual_seed(1))
    assert torch.equal(x, x2) and not torch.equal(x, x3)


def test_windows_predict_each_byte_once(docs):
    x, y = docs.windows("test", 100)
    n = (docs.test.numel() - 1) // 100
    assert x.shape == (n, 100)
    assert torch.equal(x.reshape(-1), docs.test[: n * 100].long())
    assert torch.equal(y.reshape(-1), docs.test[1: n * 100 + 1].long())
    assert docs.windows("valid", 100, max_windows=3)[0].shape == (3, 100)


@pytest.mark.parametrize("call, match", [
    (lambda c: c.split("dev"), "split"),
    (lambda c: c.batch("train", 0, 8, torch.Generator()), "batch_size"),
    (lambda c: c.batch("valid", 2, 10**7, torch.Generator()), "length"),
    (lambda c: c.windows("test", 0), "length"),
    (lambda c: c.windows("test", 8, max_windows=0), "max_windows"),
])
def test_bad_arguments(docs, call, match):
    with pytest.raises(ValueError, match=match):
        call(docs)


def test_bad_fractions():
    with pytest.raises(ValueError, match="test_fraction"):
        load_corpus(test_fraction=0.0)


def test_windows_at_given_offsets(docs):
    n = docs.num_starts("valid", 10)
    assert n == docs.valid.numel() - 10
    x, y = docs.windows_at("valid", torch.tensor([0, n - 1]), 10)
    assert torch.equal(x[0], docs.valid[:10].long()) and torch.equal(y[1], docs.valid[-10:].long())
    with pytest.raises(ValueError, match="start"):
        docs.windows_at("valid", torch.tensor([n]), 10)
