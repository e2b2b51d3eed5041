"""`moekit run mmoe` in quick mode: rows, bands, verdicts, plots, matched parameters, determinism, option
errors; the multi-task model's wiring.

Legend: R runs, P correlations, N examples, D input dim.
"""
import pytest
import torch

pytest.importorskip("matplotlib")

from moekit.repro.experiments.base import VERDICTS, make_context  # noqa: E402
from moekit.repro.experiments.mmoe import (EXPERIMENT, MODELS, Config, MultiTaskRegressor, model_specs,  # noqa: E402
                                     n_params)
from moekit.repro.experiments.options import OptionError  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


QUICK_SEEDS = 3      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_rows_bands_and_verdicts(quick_run):
    ctx, res = quick_run
    ps = res.config["correlations"]
    assert [r.name for r in res.rows] == [f"{m}, p={p:g}" for p in ps for m in MODELS]
    for r in res.rows:
        assert len(r.metrics["test_mse"]) == 3
        # labels have variance ≈ 15 (c = 3); 150 quick steps already bring every model below half of it
        assert res.mean(r.name, "test_mse") < 7.0, r.name
    assert [v.claim.split()[0] for v in res.verdicts] == ["MMoE's", "MMoE", "MMoE"]
    assert all(v.verdict in VERDICTS for v in res.verdicts)
    table = next(v for k, v in res.tables.items() if k.startswith("Final test MSE"))
    corr = [float(line.split("|")[2]) for line in table.splitlines()[2:]]
    assert corr == sorted(corr, reverse=True) and corr[0] > 0.99      # label correlation falls with p
    assert {"loss_vs_p.png", "loss_distribution.png", "test_loss_curves.png"} <= set(ctx.figures)
    for f in ctx.figures:
        assert (ctx.out_dir / f).stat().st_size > 1000


def test_matched_parameters():
    c = Config()
    specs = model_specs(c)
    counts = {m: n_params(MultiTaskRegressor(c.dim, *specs[m], c.tower_hidden)) for m in MODELS}
    assert specs["MMoE"] == (c.expert_hidden, 8, 2) and specs["OMoE"][1:] == (8, 1)
    assert specs["shared-bottom"][1:] == (1, 1)
    # OMoE moves in steps of one hidden unit per expert (±8 % here); shared-bottom matches closely
    assert abs(counts["OMoE"] - counts["MMoE"]) / counts["MMoE"] < 0.1, counts
    assert abs(counts["shared-bottom"] - counts["MMoE"]) / counts["MMoE"] < 0.02, counts
    for m in ("OMoE", "shared-bottom"):   # no other hidden size is closer to MMoE's count
        h, e, g = specs[m]
        for other in (h - 1, h + 1):
            if other >= 1:
                n = n_params(MultiTaskRegressor(c.dim, other, e, g, c.tower_hidden))
                assert abs(n - counts["MMoE"]) >= abs(counts[m] - counts["MMoE"])


def test_model_wiring():
    torch.manual_seed(0)
    x = torch.randn(5, 6)
    # shared-bottom: one expert, so the gate is the constant 1 and the bottom is that expert's MLP
    sb = MultiTaskRegressor(6, 7, experts=1, gates=1, tower_hidden=3)
    bottom = sb.bottom.experts.forward_dense(x)[0]
    want = torch.cat([t(bottom) for t in sb.towers], -1)
    torch.testing.assert_close(sb(x), want)
    # MMoE: task m's tower reads gate m's mixture
    mm = MultiTaskRegressor(6, 7, experts=3, gates=2, tower_hidden=3)
    y = mm.bottom(x).y
    torch.testing.assert_close(mm(x), torch.cat([mm.towers[0](y[0]), mm.towers[1](y[1])], -1))
    assert mm(x).shape == (5, 2)


def test_same_seed_same_numbers(tmp_path):
    argv = ["--correlations", "1", "0.5", "--dim", "10", "--steps", "5", "--n-test", "20", "--eval-every", "2"]
    runs = [EXPERIMENT.run(make_context(EXPERIMENT, tmp_path / str(i), argv, seeds=2)) for i in range(2)]
    assert [r.metrics for r in runs[0].rows] == [r.metrics for r in runs[1].rows]
    assert [v.reason for v in runs[0].verdicts] == [v.reason for v in runs[1].verdicts]


@pytest.mark.parametrize("argv,flag", [(["--correlations", "1.5"], "--correlations"), (["--dim", "1"], "--dim"),
                                       (["--lr", "0"], "--lr")])
def test_bad_options(tmp_path, argv, flag):
    with pytest.raises(OptionError, match=flag):
        make_context(EXPERIMENT, tmp_path, argv)


def test_runtime_option_errors(tmp_path):
    with pytest.raises(OptionError, match="--correlations"):
        EXPERIMENT.run(make_context(EXPERIMENT, tmp_path, ["--correlations", "0.5", "0.5"], seeds=2))
    with pytest.raises(OptionError, match="--seeds"):
        EXPERIMENT.run(make_context(EXPERIMENT, tmp_path, seeds=1))
