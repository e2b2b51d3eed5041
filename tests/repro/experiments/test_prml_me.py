"""`moekit run prml-me` in quick mode: rows, bands, verdicts, plots, determinism, option errors; the
density helpers against hand-made models.

Legend: N examples, K components.
"""
import math

import pytest
import torch

pytest.importorskip("matplotlib")

from moekit.repro.experiments.base import VERDICTS, make_context  # noqa: E402
from moekit.repro.experiments.options import OptionError  # noqa: E402
from moekit.repro.experiments.prml_me import (EXPERIMENT, MODELS, ORACLE, SingleNet, conditional_mean,  # noqa: E402
                                        log_density)
from moekit.layers.classic import MixtureOfLocalExperts  # noqa: E402
from moekit.repro.models.mixture_regression import MixtureOfLinearRegressions  # noqa: E402

pytestmark = pytest.mark.slow   # trains models (quick runs of the experiment)


QUICK_SEEDS = 1      # the shared quick_run fixture (tests/repro/conftest.py) reads these


def test_rows_bands_and_verdicts(quick_run):
    ctx, res = quick_run
    assert [r.name for r in res.rows] == [*MODELS, ORACLE]
    nll = {r.name: res.mean(r.name, "test_nll") for r in res.rows}
    # nothing beats the exact density of the generating process
    assert all(nll[ORACLE] < nll[m] for m in MODELS)
    # the mixtures capture the branches that the conditional mean cannot: far lower NLL than the single net
    assert nll["mixture of linear regressions (EM)"] < nll["single net"] - 0.3
    assert min(nll["ME"], nll["ME, MLP gate"], nll["HME"]) < nll["single net"] - 0.3
    assert len(res.verdicts) == 4 and all(v.verdict in VERDICTS for v in res.verdicts)
    em = next(v for v in res.verdicts if "EM never decreases" in v.claim)
    assert em.verdict == "reproduced", em.reason
    assert any("recalled" in n for n in res.notes)
    assert {"densities.png", "gates.png", "em_log_likelihood.png"} <= set(ctx.figures)
    for f in ctx.figures:
        assert (ctx.out_dir / f).stat().st_size > 1000


def test_densities_of_known_models():
    x = torch.tensor([0.2, 0.7])
    t = torch.tensor([0.1, 0.9])
    # mixture of two lines, hand-set: π = (0.25, 0.75), means 0 and x, σ² = 0.04
    em = MixtureOfLinearRegressions(torch.tensor([[0.0, 0.0], [0.0, 1.0]], dtype=torch.float64),
                                    torch.tensor([0.25, 0.75], dtype=torch.float64).log(),
                                    torch.full((2,), 0.04, dtype=torch.float64))

    def normal(v, mu, var):
        return math.exp(-0.5 * (v - mu) ** 2 / var) / math.sqrt(2 * math.pi * var)
    want = [math.log(0.25 * normal(tt, 0.0, 0.04) + 0.75 * normal(tt, xx, 0.04)) for xx, tt in zip([0.2, 0.7], [0.1, 0.9])]
    torch.testing.assert_close(log_density(em, x, t), torch.tensor(want, dtype=torch.float64))
    torch.testing.assert_close(conditional_mean(em, x), 0.75 * x.double())
    # a flat ME agrees with its own mixture loss (gmm NLL with learned variances)
    torch.manual_seed(0)
    me = MixtureOfLocalExperts(1, 1, 3, learn_variance=True)
    torch.testing.assert_close(-log_density(me, x, t).float(), me.loss(me(x[:, None]), t[:, None], reduction="none"),
                               rtol=1e-5, atol=1e-6)
    # the single net: one Gaussian of its stored variance around its output
    net = SingleNet(4)
    net.log_var.fill_(math.log(0.09))
    with torch.no_grad():
        mu = net(x[:, None])[:, 0].double()
    want = -0.5 * ((t.double() - mu) ** 2 / 0.09 + math.log(2 * math.pi * 0.09))
    torch.testing.assert_close(log_density(net, x, t), want)


def test_same_seed_same_numbers(tmp_path):
    argv = ["--n-train", "60", "--n-test", "50", "--steps", "20", "--restarts", "1", "--em-restarts", "1"]
    runs = [EXPERIMENT.run(make_context(EXPERIMENT, tmp_path / str(i), argv, seeds=1)) for i in range(2)]
    assert [r.metrics for r in runs[0].rows] == [r.metrics for r in runs[1].rows]


@pytest.mark.parametrize("argv,flag", [(["--components", "0"], "--components"), (["--noise", "0"], "--noise"),
                                       (["--lr", "nan"], "--lr")])
def test_bad_options(tmp_path, argv, flag):
    with pytest.raises(OptionError, match=flag):
        make_context(EXPERIMENT, tmp_path, argv)
