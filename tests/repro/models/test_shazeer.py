"""The Shazeer 2017 digits classifier: reference equivalence, hand-computed losses, init, argument errors.

Legend: N examples, F features, D dim, E experts, C classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.repro.models.shazeer import ShazeerMoEClassifier
from moekit.types import MoEOutput


def _slow_reference(model: ShazeerMoEClassifier, x_NF: torch.Tensor) -> torch.Tensor:
    """Eval-mode forward written out example by example and expert by expert."""
    moe, bank = model.moe, model.moe.experts
    out = []
    for x_F in x_NF:
        h_D = torch.relu(model.embed.weight @ x_F + model.embed.bias)
        logits_E = moe.router.gate.weight @ h_D                 # clean logits, no noise in eval
        top_vals, top_ids = logits_E.topk(moe.top_k)
        gates_K = torch.exp(top_vals) / torch.exp(top_vals).sum()
        y_D = torch.zeros_like(h_D)
        for g, e in zip(gates_K, top_ids.tolist()):
            hid_H = torch.relu(h_D @ bank.w1[e] + bank.b1[e])
            y_D = y_D + g * (hid_H @ bank.w2[e] + bank.b2[e])
        out.append(model.head.weight @ (h_D + y_D) + model.head.bias)
    return torch.stack(out)


def test_matches_slow_reference_in_eval():
    torch.manual_seed(0)
    model = ShazeerMoEClassifier(in_features=12, num_classes=5, dim=8, hidden_dim=6, num_experts=6, top_k=2).eval()
    with torch.no_grad():
        model.moe.router.gate.weight.normal_()    # zero-init would make every logit tie
    x_NF = torch.randn(9, 12)
    out = model(x_NF)
    assert isinstance(out, MoEOutput) and out.y.shape == (9, 5) and out.aux_loss.shape == ()
    torch.testing.assert_close(out.y, _slow_reference(model, x_NF), rtol=1e-5, atol=1e-5)


def _hand_model(w_importance, w_load):
    # h = relu(x) (identity embedding); W_g rows: e0 -> h0, e1 -> h1, e2 -> (h0 + h1)/2, e3 -> -(h0 + h1)
    model = ShazeerMoEClassifier(in_features=2, num_classes=3, dim=2, hidden_dim=3, num_experts=4, top_k=2,
                                 w_importance=w_importance, w_load=w_load).eval()
    with torch.no_grad():
        model.embed.weight.copy_(torch.eye(2))
        model.embed.bias.zero_()
        model.moe.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5], [-1.0, -1.0]]))
    return model


def test_aux_loss_and_balance_metrics_by_hand():
    # x1 = (2, 0): logits (2, 0, 1, -2) -> top-2 {e0, e2}, gates softmax(2, 1) = (a, b), a = e/(1+e), b = 1 - a
    # x2 = (0, 2): logits (0, 2, 1, -2) -> top-2 {e1, e2}, gates (a, b)
    # Importance = (a, a, 2b, 0), mean 1/2; Var = [2(a - 1/2)^2 + (2b - 1/2)^2 + 1/4] / 4
    #   = [2·0.2310586² + 0.0378828² + 0.25] / 4 = 0.0895528 -> CV² = Var/mean² = 0.3582113
    # Load (eval: hard top-k counts) = (1, 1, 2, 0), mean 1, Var = (0 + 0 + 1 + 1)/4 = 0.5 -> CV² = 0.5
    # aux = 0.1·0.3582113 + 0.2·0.5 = 0.13582113
    a = math.e / (1 + math.e)
    b = 1 - a
    var_imp = (2 * (a - 0.5) ** 2 + (2 * b - 0.5) ** 2 + 0.25) / 4
    assert var_imp / 0.25 == pytest.approx(0.3582113, abs=1e-6)
    x_NF = torch.tensor([[2.0, 0.0], [0.0, 2.0]])
    out = _hand_model(0.1, 0.2)(x_NF)
    assert out.aux_loss.item() == pytest.approx(0.13582113, abs=1e-6)
    m = out.metrics
    assert m["importance_loss"].item() == pytest.approx(0.3582113, abs=1e-6)
    assert m["load_loss"].item() == pytest.approx(0.5, abs=1e-6)
    assert m["tokens_per_expert"].tolist() == [1.0, 1.0, 2.0, 0.0]
    assert m["cv_load"].item() == pytest.approx(math.sqrt(0.5), abs=1e-6)          # CV, not squared
    assert m["cv_importance"].item() == pytest.approx(math.sqrt(0.3582113), abs=1e-6)
    assert m["max_over_mean_load"].item() == pytest.approx(2.0)
    assert m["experts_used"].item() == 3.0
    # With both weights 0 the aux loss is an exact zero scalar (metrics still reported).
    out0 = _hand_model(0.0, 0.0)(x_NF)
    assert out0.aux_loss.shape == () and out0.aux_loss.item() == 0.0
    assert out0.metrics["importance_loss"].item() == pytest.approx(0.3582113, abs=1e-6)


def test_router_zero_initialised_and_trainable():
    torch.manual_seed(1)
    model = ShazeerMoEClassifier(num_experts=16, top_k=2).train()
    router = model.moe.router
    assert torch.count_nonzero(router.gate.weight) == 0 and torch.count_nonzero(router.noise.weight) == 0
    x_NF = torch.rand(64, 64)
    out = model(x_NF)
    # Noise alone decides the first routing: every example still gets exactly k = 2 experts.
    assert out.metrics["tokens_per_expert"].sum().item() == 64 * 2
    (F.cross_entropy(out.y, torch.randint(10, (64,))) + out.aux_loss).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert router.gate.weight.grad.abs().sum() > 0 and router.noise.weight.grad.abs().sum() > 0


def test_bad_arguments():
    model = ShazeerMoEClassifier(in_features=8, dim=4, hidden_dim=4, num_experts=4)
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(3, 7))
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 3, 8))
    with pytest.raises(TypeError, match="x"):
        model([[0.0] * 8])
    with pytest.raises(ValueError, match="top_k"):
        ShazeerMoEClassifier(num_experts=4, top_k=5)
    with pytest.raises(ValueError, match="num_experts"):
        ShazeerMoEClassifier(num_experts=0)
    with pytest.raises(ValueError, match="w_load"):
        ShazeerMoEClassifier(w_load=-0.1)
    with pytest.raises(ValueError, match="dim"):
        ShazeerMoEClassifier(dim=2.5)
