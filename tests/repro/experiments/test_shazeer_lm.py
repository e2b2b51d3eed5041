"""`moekit run shazeer-lm` in quick mode: rows, compute matching, plots, verdicts, determinism, option errors.

Legend: E experts, D model dim.
"""
import pytest
import torch

pytest.importorskip("matplotlib")

from moekit.repro.experiments.base import Verdict, make_context  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.shazeer_lm import EXPERIMENT, MODELS, Config, verdicts  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads this
QUICK_ARGV = ("--models", ",".join(MODELS))   # every model, MoE-1024-h (not a default one) included


def test_rows_tables_plots(quick_run):
    ctx, res = quick_run
    assert EXPERIMENT.name == "shazeer-lm" and ctx.config.steps == 12 and ctx.config.dim == 32
    assert ctx.config.model_list() == list(MODELS)
    names = [r.name for r in res.rows]
    assert names == [*MODELS, "MoE-256 w_imp=0, w_load=0", "MoE-256 w_imp=0.1, w_load=0.1"]
    for r in res.rows[:len(MODELS)]:
        assert {"test_ppl", "ops_per_timestep", "params_total", "params_active", "train_time_s"} <= set(r.metrics)
        assert all(len(v) == 1 for v in r.metrics.values())           # one value per seed
        assert 1.0 < r.metrics["test_ppl"][0] < 256.0 * 1.5           # a byte model after a few steps
    assert {p.name for p in res.paper} == set(names)
    assert all(p.source is not None and p.source.status == "recalled" for p in res.paper)
    assert set(ctx.figures) == {"ppl_vs_experts.png", "train_curves.png", "valid_curves.png"}
    for name in ctx.figures:
        assert (ctx.out_dir / name).stat().st_size > 1000
    assert any("Compute-matched" in t for t in res.tables) and any("ablation" in t for t in res.tables)
    assert res.verdicts and all(isinstance(v, Verdict) for v in res.verdicts)


def test_compute_matched_and_capacity(quick_run):
    _, res = quick_run
    ops = {n: res.mean(n, "ops_per_timestep") for n in MODELS}
    base = ops["4xLSTM"]
    # at D=32 the flat gate of 256 experts (D·E) is a quarter of the budget; at the full run's D=64 an eighth
    assert all(abs(v - base) / base < 0.3 for v in ops.values()), ops
    assert ops["MoE-4"] == pytest.approx(base, rel=0.01)
    params = {n: res.mean(n, "params_total") for n in MODELS}
    assert params["MoE-4"] < params["MoE-32"] < params["MoE-256"] < params["MoE-1024-h"]
    assert params["MoE-256"] > 10 * res.mean("MoE-256", "params_active")
    # balancing statistics exist only for the MoE rows
    assert "cv_load" in res.row("MoE-32").metrics and "cv_load" not in res.row("4xLSTM").metrics


def test_same_seed_same_numbers_and_global_rng_untouched(tmp_path):
    argv = ["--steps", "3", "--models", "4xLSTM,MoE-32", "--ablation-model", "MoE-32"]
    torch.manual_seed(5)
    before = torch.get_rng_state()
    a = EXPERIMENT.run(make_context(EXPERIMENT, tmp_path / "a", argv, seeds=2))
    assert torch.equal(torch.get_rng_state(), before)
    b = EXPERIMENT.run(make_context(EXPERIMENT, tmp_path / "b", argv, seeds=2))
    def numbers(res):                                                   # all but the wall times
        return [{k: v for k, v in r.metrics.items() if k != "train_time_s"} for r in res.rows]
    assert numbers(a) == numbers(b)
    moe = a.row("MoE-32").metrics["test_ppl"]
    assert moe[0] != moe[1]                                             # two seeds, two runs
    # the ablation pair of a seed: same start, different losses -> different models
    assert a.row("MoE-32 w_imp=0, w_load=0").metrics["test_ppl"] != moe


def _fake(ppl, **extra):
    return [dict(test_ppl=p, **extra) for p in ppl]


def test_verdicts_follow_the_numbers():
    good = {"4xLSTM": _fake([10.0, 10.1]), "LSTM-wide-proj": _fake([9.9, 10.0]), "MoE-4": _fake([10.0, 10.05]),
            "MoE-32": _fake([9.0, 9.1]), "MoE-256": _fake([8.0, 8.1]), "MoE-256-h": _fake([8.05, 8.1]),
            "MoE-1024-h": _fake([7.5, 7.6])}
    abl = {"model": "MoE-256", "off": _fake([8.5, 8.6], cv_load=2.0, max_over_mean_load=9.0),
           "on": _fake([8.0, 8.1], cv_load=0.1, max_over_mean_load=1.2)}
    assert [v.verdict for v in verdicts(good, abl)] == ["reproduced"] * 6
    bad = dict(good, **{"MoE-32": _fake([11.0, 11.1]), "MoE-256": _fake([12.0, 12.1]),
                        "MoE-256-h": _fake([12.0, 12.1]), "MoE-1024-h": _fake([13.0, 13.1])})
    got = {v.claim.split(" ")[0]: v.verdict for v in verdicts(bad, None)}
    assert got["At"] == "not reproduced" and got["MoE"] == "not reproduced" and got["More"] == "not reproduced"


@pytest.mark.parametrize("argv, flag", [(["--models", "MoE-4,MoE-8"], "--models"), (["--steps", "0"], "--steps"),
                                        (["--lr", "-1"], "--lr"), (["--dropout", "1"], "--dropout")])
def test_bad_options(tmp_path, argv, flag):
    with pytest.raises(OptionError, match=flag):
        make_context(EXPERIMENT, tmp_path, argv)


def test_ablation_model_choices(tmp_path):
    with pytest.raises(SystemExit):
        make_context(EXPERIMENT, tmp_path, ["--ablation-model", "MoE-8"])
    assert Config(models=",".join(MODELS)).model_list() == list(MODELS)


def test_starved_experts_make_the_expert_claims_not_testable():
    fed = {n: _fake([10.0 - i, 10.1 - i], token_visits_per_expert_param=50.0)
           for i, n in enumerate(["MoE-4", "MoE-32", "MoE-256"])}
    fed |= {"4xLSTM": _fake([10.0, 10.1]), "LSTM-wide-proj": _fake([9.9, 10.0])}
    assert verdicts(fed, None)[0].verdict == "reproduced"
    starved = dict(fed, **{"MoE-256": _fake([8.0, 8.1], token_visits_per_expert_param=1.2)})
    first = verdicts(starved, None)[0]
    assert first.verdict == "not testable" and "MoE-256 1.2" in first.reason


def test_token_visits_per_expert_parameter_by_hand():
    from moekit.repro.models.shazeer_lm import ShazeerLM
    lm = ShazeerLM(dim=8, block="moe", num_experts=4, top_k=2)
    cost = lm.cost()
    per_expert = 8 * 16 + 16 * 8                    # D → 2D → D (the expert bank has no biases)
    assert sum(p.numel() for p in lm.middle.experts.parameters()) == 4 * per_expert
    assert cost.num_experts == 4 and cost.experts_per_token == 2 and cost.params_per_expert == per_expert
    assert cost.token_visits_per_expert_parameter(1000) == pytest.approx(1000 * 2 / 4 / per_expert)


def test_default_size_feeds_every_expert():
    """The default run can test the MoE claims: every default MoE trains each expert parameter on at least
    MIN_VISITS token visits (checked from the models' costs, without training); MoE-1024-h, left out of the
    default models, would be starved at that size and is fed at --steps 5200."""
    from moekit.repro.experiments.shazeer_lm import DEFAULT_MODELS, FLAT, HIERARCHICAL, MIN_VISITS, build_model
    c = Config()
    assert c.model_list() == list(DEFAULT_MODELS) and "MoE-1024-h" not in DEFAULT_MODELS

    def visits(name, steps):
        return build_model(name, c).cost().token_visits_per_expert_parameter(steps * c.batch_size * c.seq_len)
    fed = {n: visits(n, c.steps) for n in [*FLAT, *HIERARCHICAL] if n in DEFAULT_MODELS}
    assert min(fed.values()) >= MIN_VISITS, fed
    assert fed["MoE-256"] == pytest.approx(c.steps * c.batch_size * c.seq_len * 4 / 256 / (2 * c.dim * 2 * c.dim))
    assert visits("MoE-1024-h", c.steps) < MIN_VISITS <= visits("MoE-1024-h", 5200)
