"""`moekit run rotate` (Chen et al. 2022 rotate task on digits): the task's data, quick mode in sane
bands with all rows/plots/tables, same seed → same numbers, option validation.

Legend: N examples, L task labels.
"""
import argparse
import math

import pytest
import torch

from moekit.analysis.routing import dispatch_entropy
from moekit.experiments.base import ExperimentResult, make_context
from moekit.experiments.rotate import EXPERIMENT, MODELS, TASKS, load_tasks, rotate_task, row_name


def make_ctx(tmp_path, seeds=1, quick=True, argv=()):
    return make_context(EXPERIMENT, tmp_path, argv, seeds=seeds, quick=quick)


def test_rotate_task_data():
    x = torch.arange(2 * 64, dtype=torch.float32).reshape(2, 1, 8, 8)
    digit = torch.tensor([3, 7])
    d = rotate_task(x, digit)
    assert d.x.shape == (4, 1, 8, 8) and d.y.tolist() == [0, 0, 1, 1] and d.digit.tolist() == [3, 7, 3, 7]
    assert torch.equal(d.x[:2], x)
    # label 1 is the 90° counter-clockwise rotation: the first row becomes the first column, bottom up
    assert torch.equal(d.x[2, 0, :, 0], x[0, 0, 0].flip(0))
    assert not torch.equal(d.x[2], x[0])
    tasks = load_tasks(0)
    (ptr, pte), (rtr, rte) = tasks["plain"], tasks["rotate"]
    assert len(rtr) == 2 * len(ptr) == 2 * 1347 and len(rte) == 2 * len(pte) == 900
    assert rtr.y.float().mean() == 0.5 and torch.equal(ptr.y, ptr.digit)
    assert torch.equal(rtr.x[len(ptr):], torch.rot90(ptr.x, 1, dims=(2, 3)))


def test_quick_run_sane_bands(tmp_path):
    ctx = make_ctx(tmp_path / "a")
    res = EXPERIMENT.run(ctx)
    assert isinstance(res, ExperimentResult)
    assert [r.name for r in res.rows] == [row_name(m, t) for t in TASKS for m in MODELS]
    assert len(res.paper) == 2 and all("CIFAR-10" in r.name for r in res.paper)
    assert [r.metrics["test_acc"] for r in res.paper] == [88.2, 92.6]
    for r in res.rows:
        assert len(r.metrics["test_acc"]) == 1
        assert ("entropy" in r.metrics) == r.name.startswith("MoE")
        assert ("entropy_rotation" in r.metrics) == (r.name == "MoE, rotate")
    # measured in quick mode (5 epochs, seed 0): plain single ≈ 94 %, plain MoE ≈ 88 %, rotate 100 % for both;
    # dispatch entropy w.r.t. the digit ≈ 1.73 (plain) and ≈ 2.07 (rotate); class-blind would be ln 10 ≈ 2.30
    for model in MODELS:
        assert res.mean(row_name(model, "rotate"), "test_acc") > 97
        assert 60 < res.mean(row_name(model, "plain"), "test_acc") <= 100
    assert res.mean("MoE, plain", "entropy") < 2.1          # the router groups digits
    for task in TASKS:
        assert 0.5 < res.mean(f"MoE, {task}", "entropy") <= math.log(10) + 1e-9
        assert res.mean(f"MoE, {task}", "experts_used") >= 2
    assert 0 <= res.mean("MoE, rotate", "entropy_rotation") <= math.log(2) + 1e-9
    assert set(ctx.figures) == {"routing_plain.png", "routing_rotate.png", "loss.png", "test_acc.png"}
    assert all((tmp_path / "a" / f).exists() for f in ctx.figures)
    assert len(res.tables) == 2 and all(t.startswith("| expert |") for t in res.tables.values())
    # the routing table sums to the training set and reproduces the reported entropy
    table = next(iter(res.tables.values()))
    counts = torch.tensor([[int(c) for c in line.split("|")[2:-2]] for line in table.splitlines()[2:]])
    assert counts.sum() == 1347
    ids = torch.repeat_interleave(torch.arange(counts.numel()) // 10, counts.reshape(-1))
    labels = torch.repeat_interleave(torch.arange(counts.numel()) % 10, counts.reshape(-1))
    assert dispatch_entropy(ids, labels, counts.shape[0], 10) == pytest.approx(res.mean("MoE, plain", "entropy"))
    assert res.config["quick"] and res.config["epochs"] == 5 and res.config["seeds"] == 1


def test_same_seed_same_numbers(tmp_path):
    argv = ["--epochs", "1", "--width", "2", "--hidden", "8", "--batch-size", "128"]
    a = EXPERIMENT.run(make_ctx(tmp_path / "a", argv=argv, quick=False))
    b = EXPERIMENT.run(make_ctx(tmp_path / "b", argv=argv, quick=False))
    assert [r.metrics for r in a.rows] == [r.metrics for r in b.rows]
    assert a.config["width"] == 2 and a.config["epochs"] == 1 and not a.config["quick"]
    c = EXPERIMENT.run(make_ctx(tmp_path / "c", argv=argv + ["--data-seed", "1"], quick=False))
    assert [r.metrics for r in c.rows] != [r.metrics for r in a.rows]


@pytest.mark.parametrize("attr,value,match", [("epochs", 0, "--epochs"), ("patch_size", 3, "--patch-size"),
                                              ("moe_loss", "mse", "--moe-loss"), ("router_lr", -1.0, "--router-lr"),
                                              ("momentum", 1.0, "--momentum"), ("gate", "top2", "--gate"),
                                              ("schedule", "step", "--schedule")])
def test_bad_options(tmp_path, attr, value, match):
    ctx = make_ctx(tmp_path)
    setattr(ctx.args, attr, value)
    with pytest.raises(ValueError, match=match):
        EXPERIMENT.run(ctx)


def test_bare_namespace_uses_defaults(tmp_path):
    from moekit.experiments.rotate import DEFAULTS, _options
    assert _options(argparse.Namespace()) == DEFAULTS
