"""The `moekit` command and the runner: outputs, one-line errors, atomic results, reproducibility."""
from __future__ import annotations

import argparse
import json

import pytest
import torch

import moekit.experiments as registry
from moekit.cli import EXIT_INTERRUPTED, EXIT_USAGE, main
from moekit.experiments.base import Experiment, ExperimentResult, Row, RunContext
from moekit.experiments.runner import comparison_rows, run_experiment


def _toy_run(ctx: RunContext) -> ExperimentResult:
    """A seconds-long experiment: fit a line with noise; per-seed metrics from a seeded generator."""
    scale = float(getattr(ctx.args, "scale", 1.0))
    if scale <= 0:
        raise ValueError(f"--scale: must be > 0, got {scale}")
    accs = []
    for s in ctx.track(range(ctx.seeds), total=ctx.seeds, description="toy"):
        g = torch.Generator().manual_seed(s)
        accs.append(float(torch.rand((), generator=g)) * scale)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot(accs)
    ctx.savefig(fig, "curve.png")
    return ExperimentResult(rows=[Row("model", {"acc": accs, "n": 3.0})], paper=[Row("model", {"acc": 0.5}, {"acc": 0.1}),
                                                                             Row("paper-only", {"acc": 0.9})],
                            config={"scale": scale, "quick": ctx.quick}, tables={"extra": "| a |\n|---|\n| 1 |"},
                            notes=["a note"])


def _add(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scale", type=float, default=1.0)


TOY = Experiment(name="toy", paper="Nobody 2099", summary="a toy", est_time="1 s", run=_toy_run,
                 add_arguments=_add, default_seeds=3)


def _interrupting_run(ctx: RunContext) -> ExperimentResult:
    raise KeyboardInterrupt


@pytest.fixture
def toy_registry(monkeypatch):
    exps = {"toy": TOY, "boom": Experiment("boom", "x", "interrupts", "1 s", _interrupting_run)}
    monkeypatch.setattr(registry, "available", lambda: exps)
    return exps


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in registry.available():
        assert name in out


def test_run_writes_results_report_and_plots(toy_registry, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "toy", "--out", str(out), "--no-progress", "--scale", "2"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "toy"
    assert res["config"] == {"scale": 2.0, "quick": False}
    assert res["run"]["seeds"] == 3  # the experiment's default
    row = res["rows"][0]
    accs = [float(torch.rand((), generator=torch.Generator().manual_seed(s))) * 2 for s in range(3)]
    assert row["name"] == "model" and row["per_seed"]["acc"] == pytest.approx(accs)
    assert row["metrics"]["acc"] == pytest.approx(sum(accs) / 3)
    assert res["paper"][0] == {"name": "model", "metrics": {"acc": 0.5}, "std": {"acc": 0.1}}
    report = (out / "report.md").read_text()
    assert "| model | acc | 0.500 ± 0.100 |" in report and "![curve.png](curve.png)" in report
    assert "### extra" in report and "a note" in report
    assert (out / "curve.png").stat().st_size > 0
    printed = capsys.readouterr().out
    assert "paper vs ours" in printed and "paper-only" in printed


def test_same_seed_same_numbers(toy_registry, tmp_path):
    for d in ("a", "b"):
        assert main(["run", "toy", "--out", str(tmp_path / d), "--no-progress", "--seeds", "2"]) == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["rows"] == b["rows"]


@pytest.mark.parametrize("argv, fragment", [
    (["run", "nope"], "unknown experiment 'nope'"),
    (["run", "toy", "--seeds", "-1"], "--seeds"),
    (["run", "toy", "--seeds", "0"], "--seeds"),
    (["run", "toy", "--scale", "-1"], "--scale"),
    (["run", "toy", "--bogus"], "unrecognized arguments"),
])
def test_bad_options_give_one_line_error(toy_registry, tmp_path, capsys, argv, fragment):
    with pytest.raises(SystemExit) if "--seeds" in argv or "--bogus" in argv else _no_raise():
        rc = main(argv + ["--out", str(tmp_path / "x"), "--no-progress"])
        assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x" / "results.json").exists()


class _no_raise:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_argparse_errors_exit_with_usage_status(toy_registry, tmp_path):
    with pytest.raises(SystemExit) as e:
        main(["run", "toy", "--seeds", "-3", "--out", str(tmp_path)])
    assert e.value.code == EXIT_USAGE


def test_unwritable_out(toy_registry, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("not a dir")
    assert main(["run", "toy", "--out", str(f), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1


def test_interrupt_leaves_no_results(toy_registry, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["run", "toy", "--out", str(out), "--no-progress"]) == 0
    assert (out / "results.json").exists()
    # an interrupted re-run into the same directory removes the stale result and writes nothing
    toy_registry["toy"] = Experiment("toy", "x", "interrupts", "1 s", _interrupting_run)
    assert main(["run", "toy", "--out", str(out), "--no-progress"]) == EXIT_INTERRUPTED
    assert not (out / "results.json").exists() and not (out / "report.md").exists()
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_runner_rejects_bad_seeds(tmp_path):
    from moekit.experiments.runner import RunError
    with pytest.raises(RunError, match="--seeds"):
        run_experiment(TOY, argparse.Namespace(), tmp_path, seeds=0, show_progress=False)


def test_comparison_rows_keep_paper_only_rows():
    res = ExperimentResult(rows=[Row("a", {"m": [1.0, 3.0]})], paper=[Row("b", {"m": 2.0})], config={})
    assert comparison_rows(res) == [("a", "m", "–", "2.000 ± 1.000"), ("b", "m", "2.000", "–")]


def test_nan_metrics_become_null(tmp_path):
    def run(ctx):
        return ExperimentResult(rows=[Row("a", {"m": float("nan")})], paper=[], config={"x": float("inf")})
    exp = Experiment("nan", "x", "y", "1 s", run)
    run_experiment(exp, argparse.Namespace(), tmp_path, show_progress=False, print_results=False)
    res = json.loads((tmp_path / "results.json").read_text())  # strict JSON: no NaN tokens
    assert res["rows"][0]["metrics"]["m"] is None and res["config"]["x"] is None


def test_result_row_and_mean():
    res = ExperimentResult(rows=[Row("a", {"m": [1.0, 3.0], "s": 5.0})], paper=[], config={})
    assert res.mean("a", "m") == 2.0 and res.mean("a", "s") == 5.0
    with pytest.raises(KeyError, match="rows: \\['a'\\]"):
        res.row("b")
