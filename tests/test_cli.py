"""The `moekit` command and the runner: outputs, exit codes, never losing a result, typed options."""
from __future__ import annotations

import argparse
import json
import os
import stat
from dataclasses import dataclass
from typing import Literal

import pytest
import torch

import moekit.repro.experiments as registry
from moekit.cli import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_USAGE, main
from moekit.repro.experiments.base import Experiment, ExperimentResult, Row, RunContext, Source, Verdict
from moekit.repro.experiments.options import OptionError, option
from moekit.repro.experiments.runner import comparison_rows, run_experiment


@dataclass(frozen=True)
class ToyConfig:
    scale: float = option(1.0, "multiplies every value", gt=0)
    steps: int = option(3, "steps", ge=1, quick=1)
    mode: Literal["a", "b"] = option("a", "a mode")
    sizes: tuple[int, ...] = option((2, 4), "sizes", ge=1, nonempty=True)
    limit: int | None = option(None, "optional limit; none = no limit", ge=0)
    fast: bool = option(False, "a switch")

    def check(self) -> None:
        if self.limit is not None and self.limit > self.steps:
            raise OptionError("--limit", f"must be <= --steps ({self.steps}), got {self.limit}")


def _toy_run(ctx: RunContext) -> ExperimentResult:
    """A seconds-long experiment: per-seed metrics from a seeded generator."""
    c = ctx.config
    accs = []
    for s in ctx.track(range(ctx.seeds), total=ctx.seeds, description="toy"):
        g = torch.Generator().manual_seed(s)
        accs.append(float(torch.rand((), generator=g)) * c.scale)
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots()
    ax.plot(accs)
    ctx.savefig(fig, "curve.png")
    src = Source("Nobody 2099", "Table 1", "recalled")
    return ExperimentResult(rows=[Row("model", {"acc": accs, "n": 3.0})],
                            paper=[Row("model", {"acc": 0.5}, {"acc": 0.1}, source=src), Row("paper-only", {"acc": 0.9})],
                            config={"scale": c.scale, "steps": c.steps, "quick": ctx.quick},
                            tables={"extra": "| a |\n|---|\n| 1 |"}, notes=["a note"],
                            verdicts=[Verdict("toys work", "partly", "one of two toys")])


TOY = Experiment(name="toy", paper="Nobody 2099", summary="a toy", est_time="1 s", run=_toy_run,
                 config=ToyConfig, default_seeds=3, quick_seeds=1)


def _interrupting_run(ctx: RunContext) -> ExperimentResult:
    raise KeyboardInterrupt


def _failing_run(ctx: RunContext) -> ExperimentResult:
    raise ValueError("a bug inside the run")


@pytest.fixture
def toy_registry(monkeypatch):
    exps = {"toy": TOY, "boom": Experiment("boom", "x", "interrupts", "1 s", _interrupting_run),
            "bug": Experiment("bug", "x", "fails", "1 s", _failing_run)}
    monkeypatch.setattr(registry, "available", lambda: exps)
    return exps


def _run(tmp_path, *args):
    return main(["run", *args, "--no-progress"])


def test_list_names_every_experiment(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in registry.available():
        assert name in out


def test_run_writes_results_report_and_plots(toy_registry, tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(tmp_path, "toy", "--out", str(out), "--scale", "2") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["experiment"] == "toy"
    assert res["config"] == {"scale": 2.0, "steps": 3, "quick": False}
    assert res["run"]["seeds"] == 3  # the experiment's default
    assert 0 <= res["run"]["cpu_time_s"] and 0 <= res["run"]["wall_time_s"]
    assert "CPU time" in (out / "report.md").read_text()
    row = res["rows"][0]
    accs = [float(torch.rand((), generator=torch.Generator().manual_seed(s))) * 2 for s in range(3)]
    assert row["name"] == "model" and row["per_seed"]["acc"] == pytest.approx(accs)
    assert row["metrics"]["acc"] == pytest.approx(sum(accs) / 3)
    assert res["paper"][0] == {"name": "model", "metrics": {"acc": 0.5}, "std": {"acc": 0.1},
                               "source": {"paper": "Nobody 2099", "where": "Table 1", "status": "recalled"}}
    assert res["verdicts"] == [{"claim": "toys work", "verdict": "partly", "reason": "one of two toys"}]
    report = (out / "report.md").read_text()
    assert "| model | acc | 0.500 ± 0.100 |" in report and "![curve.png](curve.png)" in report
    assert "### extra" in report and "a note" in report
    assert "| toys work | **partly** | one of two toys |" in report
    assert "Nobody 2099, Table 1 (recalled, not checked against the paper)" in report
    assert (out / "curve.png").stat().st_size > 0
    captured = capsys.readouterr()
    assert "paper vs ours" in captured.out and "paper-only" in captured.out and "results:" in captured.out
    assert "[partly] toys work" in captured.out
    assert "paper vs ours" not in captured.err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]     # no temporary folder left behind


def test_files_get_normal_modes(toy_registry, tmp_path):
    out = tmp_path / "run"
    old = os.umask(0o022)
    try:
        assert _run(tmp_path, "toy", "--out", str(out)) == 0
    finally:
        os.umask(old)
    for name in ("results.json", "report.md", "curve.png"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    assert stat.S_IMODE(out.stat().st_mode) == 0o755


def test_quick_uses_quick_values_and_seeds(toy_registry, tmp_path):
    out = tmp_path / "q"
    assert _run(tmp_path, "toy", "--out", str(out), "--quick") == 0
    res = json.loads((out / "results.json").read_text())
    assert res["config"]["steps"] == 1 and res["run"]["seeds"] == 1
    assert _run(tmp_path, "toy", "--out", str(tmp_path / "q2"), "--quick", "--steps", "2", "--seeds", "2") == 0
    res = json.loads((tmp_path / "q2" / "results.json").read_text())
    assert res["config"]["steps"] == 2 and res["run"]["seeds"] == 2


def test_same_seed_same_numbers(toy_registry, tmp_path):
    for d in ("a", "b"):
        assert _run(tmp_path, "toy", "--out", str(tmp_path / d), "--seeds", "2") == 0
    a, b = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("a", "b"))
    assert a["rows"] == b["rows"]


@pytest.mark.parametrize("argv, fragment", [
    (["toy", "--scale", "-1"], "--scale: must be > 0, got -1"),
    (["toy", "--scale", "nan"], "--scale: must be a finite number"),
    (["toy", "--scale", "inf"], "--scale: must be a finite number"),
    (["toy", "--scale", "x"], "--scale: expected a number, got 'x'"),
    (["toy", "--steps", "0"], "--steps: must be >= 1, got 0"),
    (["toy", "--steps", "1.5"], "--steps: expected an integer"),
    (["toy", "--sizes", "2", "0"], "--sizes: must be >= 1, got 0"),
    (["toy", "--sizes", ""], "--sizes: expected at least one value"),
    (["toy", "--limit", "5"], "--limit: must be <= --steps (3), got 5"),
    (["toy", "--mode", "c"], "--mode"),
    (["toy", "--seeds", "0"], "--seeds"),
    (["toy", "--bogus"], "unrecognized arguments"),
    (["nope"], "unknown experiment 'nope'"),
])
def test_usage_errors_exit_2_in_one_line_and_create_nothing(toy_registry, tmp_path, capsys, argv, fragment):
    out = tmp_path / "x" / "y"
    try:
        rc = main(["run", *argv, "--out", str(out), "--no-progress"])
    except SystemExit as e:          # argparse's own errors
        rc = e.code
    assert rc == EXIT_USAGE
    err = capsys.readouterr().err
    assert fragment in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_typed_values_reach_the_run(toy_registry, tmp_path):
    ctx_seen = {}

    def run(ctx):
        ctx_seen["config"] = ctx.config
        return _toy_run(ctx)
    toy_registry["toy"] = Experiment("toy", "x", "y", "1 s", run, config=ToyConfig)
    assert _run(tmp_path, "toy", "--out", str(tmp_path / "o"), "--sizes", "1,3", "5", "--limit", "2",
                "--fast", "--mode", "b") == 0
    c = ctx_seen["config"]
    assert c == ToyConfig(sizes=(1, 3, 5), limit=2, fast=True, mode="b")


def test_help_shows_defaults_and_exits_0(toy_registry, capsys):
    with pytest.raises(SystemExit) as e:
        main(["run", "toy", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "(default 3; --quick: 1)" in out and "(default 1)" in out and "(default 2,4)" in out
    assert main(["run", "--help"]) == 0
    assert "toy" in capsys.readouterr().out
    assert main(["run"]) == EXIT_USAGE


def test_non_empty_out_is_refused_and_kept(toy_registry, tmp_path, capsys):
    out = tmp_path / "r"
    assert _run(tmp_path, "toy", "--out", str(out)) == 0
    before = (out / "results.json").read_text()
    assert _run(tmp_path, "toy", "--out", str(out), "--scale", "3") == EXIT_USAGE
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    assert _run(tmp_path, "toy", "--out", str(out), "--scale", "3", "--overwrite") == 0
    assert json.loads((out / "results.json").read_text())["config"]["scale"] == 3.0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _run(tmp_path, "toy", "--out", str(empty)) == 0


@pytest.mark.parametrize("name, code", [("boom", EXIT_INTERRUPTED), ("bug", EXIT_FAILED)])
def test_failed_or_interrupted_rerun_keeps_the_old_result(toy_registry, tmp_path, capsys, name, code):
    out = tmp_path / "r"
    assert _run(tmp_path, "toy", "--out", str(out)) == 0
    files = sorted(p.name for p in out.iterdir())
    before = (out / "results.json").read_text()
    toy_registry["toy"] = toy_registry[name]
    assert _run(tmp_path, "toy", "--out", str(out), "--overwrite") == code
    assert (out / "results.json").read_text() == before and sorted(p.name for p in out.iterdir()) == files
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]   # the temporary folder is gone
    err = capsys.readouterr().err
    if name == "bug":
        assert "Traceback" in err and "a bug inside the run" in err


def test_failed_first_run_creates_no_folder(toy_registry, tmp_path, capsys):
    assert _run(tmp_path, "bug", "--out", str(tmp_path / "new")) == EXIT_FAILED
    assert list(tmp_path.iterdir()) == []


def test_unwritable_out(toy_registry, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("not a dir")
    assert _run(tmp_path, "toy", "--out", str(f)) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out" in err and len(err.strip().splitlines()) == 1
    assert _run(tmp_path, "toy", "--out", str(f / "sub")) == EXIT_USAGE


def test_experiment_without_options(toy_registry, tmp_path):
    def run(ctx):
        assert ctx.config is None
        return ExperimentResult(rows=[Row("m", {"x": 1.0})], paper=[], config={})
    toy_registry["plain"] = Experiment("plain", "x", "no options", "1 s", run)
    assert _run(tmp_path, "plain", "--out", str(tmp_path / "p")) == 0
    with pytest.raises(SystemExit) as e:
        _run(tmp_path, "plain", "--out", str(tmp_path / "q"), "--x", "4")
    assert e.value.code == EXIT_USAGE and not (tmp_path / "q").exists()


def test_runner_rejects_bad_seeds(tmp_path):
    from moekit.repro.experiments.runner import RunError
    with pytest.raises(RunError, match="--seeds"):
        run_experiment(TOY, argparse.Namespace(), tmp_path / "o", seeds=0, show_progress=False)


def test_comparison_rows_keep_paper_only_rows():
    res = ExperimentResult(rows=[Row("a", {"m": [1.0, 3.0]})], paper=[Row("b", {"m": 2.0})], config={})
    assert comparison_rows(res) == [("a", "m", "–", "2.000 ± 1.000"), ("b", "m", "2.000", "–")]


def test_nan_metrics_become_null(tmp_path):
    def run(ctx):
        return ExperimentResult(rows=[Row("a", {"m": float("nan")})], paper=[], config={"x": float("inf")})
    exp = Experiment("nan", "x", "y", "1 s", run)
    run_experiment(exp, argparse.Namespace(), tmp_path / "o", show_progress=False, print_results=False)
    res = json.loads((tmp_path / "o" / "results.json").read_text())  # strict JSON: no NaN tokens
    assert res["rows"][0]["metrics"]["m"] is None and res["config"]["x"] is None


def test_result_row_and_mean():
    res = ExperimentResult(rows=[Row("a", {"m": [1.0, 3.0], "s": 5.0})], paper=[], config={})
    assert res.mean("a", "m") == 2.0 and res.mean("a", "s") == 5.0
    with pytest.raises(KeyError, match="rows: \\['a'\\]"):
        res.row("b")


def test_verdict_and_source_are_checked():
    with pytest.raises(ValueError, match="verdict"):
        Verdict("c", "maybe", "r")
    with pytest.raises(ValueError, match="one line"):
        Verdict("c", "partly", "two\nlines")
    with pytest.raises(ValueError, match="status"):
        Source("p", "Table 1", "guessed")


# --- run safety: every bad request refused before anything is written; signals clean up like Ctrl-C ---

def _listing(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.mark.parametrize("value", ["99999999999999999999", "100000", "0", str((os.cpu_count() or 1) + 1), "two"])
def test_threads_out_of_range_is_a_usage_error(toy_registry, tmp_path, capsys, value):
    with pytest.raises(SystemExit) as e:
        main(["run", "toy", "--out", str(tmp_path / "r"), "--threads", value, "--no-progress"])
    err = capsys.readouterr().err
    assert e.value.code == EXIT_USAGE and "--threads" in err and f"1 to {os.cpu_count()}" in err
    assert len(err.strip().splitlines()) == 1 and list(tmp_path.iterdir()) == []


def test_threads_at_the_cpu_count_run(toy_registry, tmp_path):
    assert _run(tmp_path, "toy", "--out", str(tmp_path / "r"), "--threads", str(os.cpu_count())) == 0


def test_per_experiment_minimum_seeds_checked_before_any_folder(toy_registry, tmp_path, capsys):
    toy_registry["pair"] = Experiment("pair", "x", "needs two seeds", "1 s", _toy_run, config=ToyConfig,
                                      min_seeds=2)
    assert _run(tmp_path, "pair", "--out", str(tmp_path / "r"), "--seeds", "1") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--seeds" in err and "at least 2" in err and len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []
    assert _run(tmp_path, "pair", "--out", str(tmp_path / "r"), "--seeds", "2") == 0
    with pytest.raises(Exception, match="--seeds"):
        run_experiment(toy_registry["pair"], argparse.Namespace(), tmp_path / "o", seeds=1, show_progress=False)
    assert not (tmp_path / "o").exists()


def test_mmoe_with_one_seed_is_refused_before_any_folder(tmp_path, capsys):
    assert main(["run", "mmoe", "--seeds", "1", "--out", str(tmp_path / "r"), "--no-progress"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--seeds" in err and "Traceback" not in err and list(tmp_path.iterdir()) == []
    assert main(["run", "mmoe", "--correlations", "0.5", "0.5", "--out", str(tmp_path / "r")]) == EXIT_USAGE
    assert "--correlations" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("where", [".", "..", "work", "/"])
def test_out_is_never_the_working_directory_or_a_parent(toy_registry, tmp_path, capsys, monkeypatch, where):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("mine")
    monkeypatch.chdir(work)
    out = str(work) if where == "work" else where
    before = _listing(tmp_path)
    assert _run(tmp_path, "toy", "--out", out, "--overwrite") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "--out" in err and "working directory" in err and len(err.strip().splitlines()) == 1
    assert _listing(tmp_path) == before
    from moekit.repro.experiments.runner import RunError
    with pytest.raises(RunError, match="working directory"):
        run_experiment(TOY, argparse.Namespace(), out, overwrite=True, show_progress=False)
    assert _listing(tmp_path) == before
    assert _run(tmp_path, "toy", "--out", "sub") == 0 and (work / "sub" / "results.json").exists()


def test_a_second_run_cannot_write_an_out_that_is_being_written(toy_registry, tmp_path, capsys):
    from moekit.repro.experiments.runner import out_dir_lock
    out = tmp_path / "r"
    with out_dir_lock(out):              # a run in progress holds the lock
        assert _run(tmp_path, "toy", "--out", str(out)) == EXIT_USAGE
        assert _run(tmp_path, "toy", "--out", str(out), "--overwrite") == EXIT_USAGE
        err = capsys.readouterr().err
        assert "--out" in err and "another run" in err
        assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == []          # the lock file goes with the run
    assert _run(tmp_path, "toy", "--out", str(out)) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r"]


def test_the_run_holds_the_lock_while_it_runs(toy_registry, tmp_path, capsys):
    from moekit.repro.experiments.runner import RunError, out_dir_lock
    out = tmp_path / "r"
    seen = []

    def nested(ctx):
        with pytest.raises(RunError, match="another run"):
            with out_dir_lock(out):
                pass
        seen.append(True)
        return _toy_run(ctx)
    toy_registry["nested"] = Experiment("nested", "x", "checks the lock", "1 s", nested, config=ToyConfig)
    assert _run(tmp_path, "nested", "--out", str(out)) == 0 and seen == [True]


@pytest.mark.parametrize("signame, code", [("SIGTERM", 143), ("SIGHUP", 129)])
def test_sigterm_and_sighup_clean_up_like_ctrl_c(toy_registry, tmp_path, capsys, signame, code):
    import signal
    sig = getattr(signal, signame)
    before_handler = signal.getsignal(sig)

    def killed(ctx):
        (ctx.out_dir / "partial.txt").write_text("half a result")
        os.kill(os.getpid(), sig)
        raise AssertionError("the signal should have stopped the run")
    toy_registry["killed"] = Experiment("killed", "x", "gets a signal", "1 s", killed)
    out = tmp_path / "r"
    assert _run(tmp_path, "toy", "--out", str(out)) == 0
    before = _listing(tmp_path)
    assert _run(tmp_path, "killed", "--out", str(out), "--overwrite") == code
    assert _listing(tmp_path) == before            # no .running-* or lock left, the old result kept
    assert signame in capsys.readouterr().err
    assert signal.getsignal(sig) == before_handler
    assert _run(tmp_path, "killed", "--out", str(tmp_path / "new")) == code
    assert _listing(tmp_path) == before
