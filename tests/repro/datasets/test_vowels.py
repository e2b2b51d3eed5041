"""Vowel tables and speaker-disjoint splits. Legend: N rows, F features, S speakers."""
import csv
from importlib import resources

import pytest
import torch

from moekit.repro.datasets.vowels import SPEAKER_TYPES, load_hillenbrand, load_peterson_barney, speaker_split


def test_peterson_barney_default_table():
    t = load_peterson_barney()
    # 76 speakers × 4 vowels × 2 repetitions
    assert len(t) == 608 and t.features_NF.shape == (608, 2)
    assert t.vowels == ("iy", "ih", "aa", "ah") and t.feature_names == ("F1", "F2")
    assert t.speakers.tolist() == list(range(1, 77))
    # 33 men, 28 women, 15 children, 8 rows each
    assert torch.bincount(t.speaker_type_N).tolist() == [33 * 8, 28 * 8, 15 * 8]
    assert t.speaker_types == SPEAKER_TYPES == ("m", "w", "c")
    assert torch.bincount(t.vowel_N).tolist() == [152] * 4
    # first rows of the file: man 1, "iy" F1/F2 = 240/2280 and 280/2400, then "ih" 390/2030
    assert t.features_NF[:3].tolist() == [[240.0, 2280.0], [280.0, 2400.0], [390.0, 2030.0]]
    assert t.vowel_N[:3].tolist() == [0, 0, 1]


def test_table_matches_the_csv_row_by_row():
    text = resources.files("moekit.repro.datasets").joinpath("files", "peterson_barney_1952.csv").read_text()
    rows = [r for r in csv.DictReader(text.splitlines()) if r["Vowel"] in ("uw", "er")]
    t = load_peterson_barney(vowels=("uw", "er"), features=("F3", "F0"))
    assert len(t) == len(rows) == 304
    for i in (0, 17, 303):
        assert t.features_NF[i].tolist() == [float(rows[i]["F3"]), float(rows[i]["F0"])]
        assert t.vowels[t.vowel_N[i]] == rows[i]["Vowel"]
        assert int(t.speaker_N[i]) == int(rows[i]["Speaker"])
        assert SPEAKER_TYPES[t.speaker_type_N[i]] == rows[i]["Type"]


def test_speaker_split_is_disjoint_seeded_and_train_standardised():
    t = load_peterson_barney()
    s = t.speaker_split(seed=3)
    tr, te = set(s.train.speaker_N.tolist()), set(s.test.speaker_N.tolist())
    assert len(tr) == 50 and len(te) == 25 and not tr & te
    assert len(s.left_out) == 1 and not set(s.left_out) & (tr | te)
    assert len(s.train) == 400 and len(s.test) == 200
    # standardisation from the train rows only: train features have mean 0 / std 1, test ones need not
    torch.testing.assert_close(s.x_train.mean(0), torch.zeros(2), atol=1e-5, rtol=0)
    torch.testing.assert_close(s.x_train.std(0), torch.ones(2))
    torch.testing.assert_close(s.mean_F, s.train.features_NF.mean(0))
    torch.testing.assert_close(s.x_test, (s.test.features_NF - s.mean_F) / s.std_F)
    # same seed → same split; another seed → another split
    again = speaker_split(t, 3)
    assert torch.equal(again.train.speaker_N, s.train.speaker_N)
    assert set(t.speaker_split(seed=4).train.speaker_N.tolist()) != tr


def test_speaker_split_sizes_and_bad_arguments():
    t = load_peterson_barney()
    s = t.speaker_split(0, n_train=60, n_test=16)
    assert len(set(s.train.speaker_N.tolist())) == 60 and len(set(s.test.speaker_N.tolist())) == 16
    assert s.left_out == ()
    with pytest.raises(ValueError, match="n_train"):
        t.speaker_split(0, n_train=70, n_test=10)
    with pytest.raises(ValueError, match="n_test"):
        t.speaker_split(0, n_test=0)
    with pytest.raises(TypeError, match="seed"):
        t.speaker_split(0.5)


def test_bad_names_raise():
    with pytest.raises(ValueError, match="vowels"):
        load_peterson_barney(vowels=("iy", "xx"))
    with pytest.raises(ValueError, match="features"):
        load_peterson_barney(features=("F4",))
    with pytest.raises(TypeError, match="vowels"):
        load_peterson_barney(vowels="iy")
    with pytest.raises(ValueError, match="vowels"):
        load_peterson_barney(vowels=())


def test_hillenbrand_table():
    t = load_hillenbrand(vowels=("iy", "ah"), features=("F1", "F2"))
    assert len(t.speakers) == 139
    assert (t.features_NF > 0).all()
    text = resources.files("moekit.repro.datasets").joinpath("files", "hillenbrand_1995.csv").read_text()
    rows = list(csv.DictReader(text.splitlines()))
    kept = [sum(r["Vowel"] == v and float(r["F1"]) > 0 and float(r["F2"]) > 0 for r in rows) for v in ("iy", "ah")]
    assert kept == [139, 136]  # three "ah" tokens have no F2 measurement
    assert torch.bincount(t.vowel_N).tolist() == kept
    full = load_hillenbrand(features=("F1", "F2", "F3"))
    assert len(full) < 1668  # rows with an unmeasured (0) formant are dropped
