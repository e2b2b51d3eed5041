"""Shared fixtures of the reproduction tests.

``quick_run``: ``(ctx, result)`` of the test module's ``EXPERIMENT`` run once per module in quick mode.
A module sets ``QUICK_SEEDS`` (default: the experiment's ``--quick`` seeds) and ``QUICK_ARGV`` (the
experiment's own flags, default none) to change the run.
"""
from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def quick_run(request, tmp_path_factory):
    from moekit.repro.experiments.base import make_context

    module = request.module
    experiment = module.EXPERIMENT
    seeds = getattr(module, "QUICK_SEEDS", experiment.seeds_for(True))
    argv = list(getattr(module, "QUICK_ARGV", ()))
    ctx = make_context(experiment, tmp_path_factory.mktemp(experiment.name), argv, seeds=seeds, quick=True)
    return ctx, experiment.run(ctx)
