"""The default affinity penalty of SituationalFusion must push a collapsed fusion back towards balance.

The earlier default ("pairwise", off-diagonal terms only) is zero with a zero gradient when the weights sit on
one view, so training that drifts into a collapsed weighting stays there.
"""
import inspect

import pytest
import torch

from moekit.layers.fusion import SituationalFusion, affinity_penalty


def _collapsed_fusion(penalty_form=None, affinity=None, N=3):
    """A fusion whose weights sit almost entirely on view 0 for every input (logit bias 6 against 0)."""
    torch.manual_seed(0)
    kwargs = {} if penalty_form is None else {"penalty_form": penalty_form}
    m = SituationalFusion([4] * N, num_actions=5, affinity=torch.eye(N) if affinity is None else affinity,
                          beta=1.0, **kwargs)
    last = m.fusion[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[0] = 6.0
    feats = [torch.randn(16, 4) for _ in range(N)]
    return m, feats


def test_default_is_quadratic_in_both_entry_points():
    assert inspect.signature(SituationalFusion).parameters["penalty_form"].default == "quadratic"
    assert inspect.signature(affinity_penalty).parameters["form"].default == "quadratic"
    w = torch.tensor([0.5, 0.3, 0.2])
    A = torch.rand(3, 3)
    torch.testing.assert_close(affinity_penalty(w, A), affinity_penalty(w, A, "quadratic"))


@pytest.mark.parametrize("affinity", [None, torch.tensor([[1.0, 0.2, 0.0], [0.2, 1.0, 0.5], [0.0, 0.5, 1.0]])],
                         ids=["identity", "dense"])
def test_default_penalty_pushes_away_from_a_collapsed_weighting(affinity):
    m, feats = _collapsed_fusion(affinity=affinity)
    out = m(feats)
    w0 = out.metrics["fusion_weights"][0].item()
    assert w0 > 0.98
    # a collapsed weighting is penalised: w̄ᵀ A w̄ ≈ A_00 = 1
    assert out.metrics["affinity_penalty"].item() > 0.9
    out.aux_loss.backward()
    # the logit of the dominant view has a positive gradient: descent lowers it
    grad_bias = m.fusion[-1].bias.grad
    assert grad_bias[0].item() > 1e-3
    # and a few plain gradient steps on the penalty alone move weight off view 0
    opt = torch.optim.SGD(m.fusion.parameters(), lr=50.0)
    for _ in range(20):
        opt.zero_grad()
        m(feats).aux_loss.backward()
        opt.step()
    assert m(feats).metrics["fusion_weights"][0].item() < w0 - 0.05


def test_pairwise_stays_selectable_and_is_blind_to_collapse():
    # the earlier default, kept by name: zero penalty and zero gradient on a collapsed weighting (A = I)
    m, feats = _collapsed_fusion("pairwise")
    out = m(feats)
    assert m.penalty_form == "pairwise"
    assert out.metrics["affinity_penalty"].item() == 0.0
    out.aux_loss.backward()
    assert m.fusion[-1].bias.grad.abs().max().item() == 0.0
    w = torch.tensor([0.5, 0.3, 0.2])
    A = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.1], [0.0, 0.1, 1.0]])
    assert affinity_penalty(w, A, "pairwise").item() == pytest.approx(0.252)


def test_unknown_form_names_the_argument_and_the_choices():
    with pytest.raises(ValueError, match="penalty_form.*'quadratic', 'pairwise', 'mean'.*'max'"):
        SituationalFusion([3], 2, affinity=torch.eye(1), penalty_form="max")
    with pytest.raises(ValueError, match="form.*'quadratic', 'pairwise', 'mean'"):
        affinity_penalty(torch.ones(2) / 2, torch.eye(2), "max")
