"""Every registered experiment is well formed and has a quick-mode test of its own."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from moekit.repro.experiments import available, get

EXPERIMENTS = available()
TEST_DIR = Path(__file__).parent


def test_registry_is_not_empty():
    assert {"chen2022", "vowels", "load-balance"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))
def test_experiment_metadata_and_options(name):
    exp = EXPERIMENTS[name]
    assert exp.name == name and exp.paper and exp.summary and exp.est_time
    assert exp.default_seeds >= 1
    p = argparse.ArgumentParser()
    exp.add_flags(p)
    args = p.parse_args([])  # every option has a default
    if exp.config is not None:   # the defaults and the quick values pass the config's own checks
        exp.make_config(args, quick=False)
        exp.make_config(args, quick=True)
    module = exp.run.__module__.rsplit(".", 1)[-1]
    assert (TEST_DIR / f"test_{module}.py").exists(), f"{name}: no tests/experiments/test_{module}.py"


def test_get_unknown_lists_names():
    with pytest.raises(ValueError, match="available: .*chen2022"):
        get("no-such-experiment")
