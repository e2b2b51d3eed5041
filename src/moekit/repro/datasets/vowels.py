"""Vowel formant tables (Peterson & Barney 1952; Hillenbrand et al. 1995) and speaker-disjoint splits.

Legend: T examples (utterances), D input features (formants, Hz); see the package legend. The public
fields keep their historical suffixes: ``features_NF`` is (T, D), ``vowel_N``, ``speaker_N`` and
``speaker_type_N`` are (T,), ``mean_F`` and ``std_F`` are (D,).

The files ship as package data (``moekit/repro/datasets/files``, provenance in ``PROVENANCE.md`` there).
Jacobs, Jordan, Nowlan & Hinton (1991) classify F1/F2 of the vowels [i] [ɪ] [a] [ʌ] (codes
``iy ih aa ah``) from 75 Peterson & Barney speakers, 50 for training and 25 for testing::

    table = load_peterson_barney()                # 76 speakers × 4 vowels × 2 repetitions = 608 rows
    split = table.speaker_split(seed=0)           # 50 train / 25 test speakers, one speaker left out
    x_train, x_test = split.x_train, split.x_test  # standardised with the train split's mean and std
"""
from __future__ import annotations

import csv
import io
from dataclasses import dataclass
from importlib import resources
from typing import Sequence

import torch
from torch import Tensor

__all__ = ["PB_VOWELS", "SPEAKER_TYPES", "VowelSplit", "VowelTable", "load_hillenbrand", "load_peterson_barney",
           "speaker_split"]

PB_VOWELS = ("iy", "ih", "eh", "ae", "ah", "aa", "ao", "uh", "uw", "er")
PB_FEATURES = ("F0", "F1", "F2", "F3")
HB_VOWELS = ("iy", "ih", "ei", "eh", "ae", "ah", "aw", "oa", "oo", "uw", "uh", "er")
HB_FEATURES = ("f0", "dur", "F1", "F2", "F3")
SPEAKER_TYPES = ("m", "w", "c")  # men, women, children


@dataclass(frozen=True)
class VowelTable:
    """Rows of a formant table. Label tensors index into the name tuples (``vowels``, ``speaker_types``)."""

    features_NF: Tensor       # float32 (T, D), Hz (or seconds for Hillenbrand's "dur")
    vowel_N: Tensor           # int64 (T,), index into ``vowels``
    speaker_N: Tensor         # int64 (T,), speaker id (unique across speaker types)
    speaker_type_N: Tensor    # int64 (T,), index into ``speaker_types``
    vowels: tuple[str, ...]
    feature_names: tuple[str, ...]
    speaker_types: tuple[str, ...] = SPEAKER_TYPES

    def __len__(self) -> int:
        return self.vowel_N.shape[0]

    @property
    def speakers(self) -> Tensor:
        """Sorted unique speaker ids, (S,)."""
        return torch.unique(self.speaker_N)

    def subset(self, index: Tensor) -> "VowelTable":
        """Rows selected by a boolean mask or an index tensor."""
        return VowelTable(self.features_NF[index], self.vowel_N[index], self.speaker_N[index],
                          self.speaker_type_N[index], self.vowels, self.feature_names, self.speaker_types)

    def speaker_split(self, seed: int, n_train: int = 50, n_test: int = 25) -> "VowelSplit":
        """Speaker-disjoint split: a seeded random permutation of the speakers; the first ``n_train`` train,
        the next ``n_test`` test, the rest are left out (Peterson & Barney: 76 speakers, so with the paper's
        50 + 25 one random speaker is dropped per split). Standardisation is fitted on the train rows only."""
        for name, v in (("seed", seed), ("n_train", n_train), ("n_test", n_test)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name}: expected an int, got {type(v).__name__}")
        speaker_ids = self.speakers
        if n_train < 1 or n_test < 1 or n_train + n_test > len(speaker_ids):
            raise ValueError(f"n_train, n_test: expected n_train >= 1, n_test >= 1 and n_train + n_test <= "
                             f"{len(speaker_ids)} speakers, got n_train={n_train}, n_test={n_test}")
        gen = torch.Generator().manual_seed(seed)
        shuffled_ids = speaker_ids[torch.randperm(len(speaker_ids), generator=gen)]
        train_ids, test_ids = shuffled_ids[:n_train], shuffled_ids[n_train:n_train + n_test]
        train = self.subset(torch.isin(self.speaker_N, train_ids))
        test = self.subset(torch.isin(self.speaker_N, test_ids))
        mean_F = train.features_NF.mean(0)
        std_F = train.features_NF.std(0)  # unbiased; train split only, so nothing leaks from the test speakers
        left_out = tuple(int(s) for s in shuffled_ids[n_train + n_test:])
        return VowelSplit(train=train, test=test, mean_F=mean_F, std_F=std_F, left_out=left_out)


@dataclass(frozen=True)
class VowelSplit:
    """Train/test tables of disjoint speakers plus the train-fitted standardisation."""

    train: VowelTable
    test: VowelTable
    mean_F: Tensor          # (D,) train-split mean
    std_F: Tensor           # (D,) train-split std
    left_out: tuple[int, ...]  # speakers in neither split

    def standardize(self, features_NF: Tensor) -> Tensor:
        return (features_NF - self.mean_F) / self.std_F

    @property
    def x_train(self) -> Tensor:
        return self.standardize(self.train.features_NF)

    @property
    def x_test(self) -> Tensor:
        return self.standardize(self.test.features_NF)


def speaker_split(table: VowelTable, seed: int, n_train: int = 50, n_test: int = 25) -> VowelSplit:
    """Function form of :meth:`VowelTable.speaker_split`."""
    return table.speaker_split(seed, n_train=n_train, n_test=n_test)


def _read_rows(filename: str) -> list[dict[str, str]]:
    text = resources.files("moekit.repro.datasets").joinpath("files", filename).read_text(encoding="utf-8")
    return list(csv.DictReader(io.StringIO(text)))


def _check_names(name: str, values: Sequence[str], allowed: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise TypeError(f"{name}: expected a sequence of names such as {allowed[:2]}, got the string {values!r}")
    values = tuple(values)
    bad = [v for v in values if v not in allowed]
    if not values or bad or len(set(values)) != len(values):
        raise ValueError(f"{name}: expected distinct names from {allowed}, got {values!r}")
    return values


def _build(rows: list[dict[str, str]], vowels: tuple[str, ...], features: tuple[str, ...],
           speaker_key) -> VowelTable:
    feats, vowel, speaker, stype = [], [], [], []
    ids: dict[tuple, int] = {}
    for r in rows:
        key = speaker_key(r)
        # an int key is the file's own id; other keys are numbered 1.. in file order over all rows
        sid = key if isinstance(key, int) else ids.setdefault(key, len(ids) + 1)
        if r["Vowel"] not in vowels:
            continue
        values = [float(r[f]) for f in features]
        if any(v <= 0 for v in values):  # 0 marks an unmeasured value (Hillenbrand)
            continue
        feats.append(values)
        vowel.append(vowels.index(r["Vowel"]))
        speaker.append(sid)
        stype.append(SPEAKER_TYPES.index(r["Type"]))
    return VowelTable(torch.tensor(feats, dtype=torch.float32), torch.tensor(vowel), torch.tensor(speaker),
                      torch.tensor(stype), vowels, features)


def load_peterson_barney(vowels: Sequence[str] = ("iy", "ih", "aa", "ah"),
                         features: Sequence[str] = ("F1", "F2")) -> VowelTable:
    """Peterson & Barney (1952): 76 speakers (33 men, 28 women, 15 children), 10 vowels, 2 repetitions.

    ``vowels`` from ``PB_VOWELS`` (default: the four of Jacobs et al. 1991), ``features`` from
    ``("F0", "F1", "F2", "F3")``. Speaker ids are the file's (1–76); speaker types index ``("m", "w", "c")``.
    """
    vowels = _check_names("vowels", vowels, PB_VOWELS)
    features = _check_names("features", features, PB_FEATURES)
    return _build(_read_rows("peterson_barney_1952.csv"), vowels, features, lambda r: int(r["Speaker"]))


def load_hillenbrand(vowels: Sequence[str] = HB_VOWELS, features: Sequence[str] = ("F1", "F2")) -> VowelTable:
    """Hillenbrand et al. (1995): 139 speakers (45 men, 48 women, 46 children), 12 vowels, steady-state values.

    Speakers are identified by (type, sex, number) in the file and renumbered 1–139 in file order. Rows with
    an unmeasured (zero) value in a requested feature are dropped.
    """
    vowels = _check_names("vowels", vowels, HB_VOWELS)
    features = _check_names("features", features, HB_FEATURES)
    return _build(_read_rows("hillenbrand_1995.csv"), vowels, features,
                  lambda r: (r["Type"], r["Sex"], r["Speaker"]))
