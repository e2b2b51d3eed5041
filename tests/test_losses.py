"""Loss functions against values worked out by hand (arithmetic in the comments)."""
import math

import pytest
import torch

from moekit import losses as L


def phi(z):
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_cv_squared_by_hand():
    # v = [1, 2, 3]: mean 2, population variance (1 + 0 + 1)/3 = 2/3, CV^2 = (2/3) / 4 = 1/6
    assert L.cv_squared(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(1 / 6, rel=1e-6)
    assert L.cv_squared(torch.tensor([5.0, 5.0])).item() == 0.0
    assert L.cv_squared(torch.tensor([4.0])).item() == 0.0


def test_importance_loss_by_hand():
    # Importance = column sums = [0.6, 1.1, 0.3]; mean 2/3;
    # var = ((0.6-2/3)^2 + (1.1-2/3)^2 + (0.3-2/3)^2)/3 = (0.004444 + 0.187778 + 0.134444)/3 = 0.108889
    # CV^2 = 0.108889 / (4/9) = 0.245
    gates = torch.tensor([[0.6, 0.4, 0.0], [0.0, 0.7, 0.3]])
    assert L.importance_loss(gates).item() == pytest.approx(0.245, rel=1e-4)


def test_switch_aux_loss_uniform_is_one():
    # probs all 1/E, f_i all 1/E: E * Σ (1/E)(1/E) = 1
    logits = torch.zeros(8, 4)
    ids = torch.arange(8).remainder(4)[:, None]
    assert L.switch_aux_loss(logits, ids).item() == pytest.approx(1.0)
    # top-2 uniform too: 8 tokens x 2 slots, each expert gets 4 of 16
    ids2 = torch.stack([torch.arange(8) % 4, (torch.arange(8) + 1) % 4], 1)
    assert L.switch_aux_loss(logits, ids2).item() == pytest.approx(1.0)


def test_switch_aux_loss_skewed_by_hand():
    # logits [ln 3, 0] -> p = [0.75, 0.25] for both tokens; both go to expert 0: f = [1, 0]
    # E Σ f_i P_i = 2 * (1 * 0.75) = 1.5
    logits = torch.tensor([[math.log(3), 0.0]] * 2)
    ids = torch.tensor([[0], [0]])
    assert L.switch_aux_loss(logits, ids).item() == pytest.approx(1.5, rel=1e-6)


def test_gshard_aux_loss_uniform_is_one():
    # E^2 mean_e(m_e g_e) = E^2 * (1/E) * (1/E)(1/E) * E... = E^2 * mean(1/E^2) = 1
    assert L.gshard_aux_loss(torch.zeros(8, 4), (torch.arange(8) % 4)[:, None]).item() == pytest.approx(1.0)


def test_router_z_loss_by_hand():
    # row 1: logsumexp(0, 0) = ln 2; row 2: logsumexp(ln 3, 0) = ln 4 = 2 ln 2
    # mean of squares = (ln²2 + 4 ln²2)/2 = 2.5 ln²2 = 1.2011325
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    assert L.router_z_loss(logits).item() == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)


def test_shazeer_load_by_hand():
    # clean = [1, 0, 0], noisy H = [1.2, 0.5, -0.3], std 1, k = 1.
    # Expert 0 is in the top 1: the bar is the 2nd largest of H = 0.5 -> P = Φ((1 - 0.5)/1) = Φ(0.5)
    # Experts 1, 2 are out: the bar is the 1st largest of H = 1.2 -> P = Φ((0 - 1.2)/1) = Φ(-1.2)
    clean = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.2, 0.5, -0.3]])
    load = L.shazeer_load(clean, noisy, torch.ones(1, 3), k=1)
    expected = torch.tensor([phi(0.5), phi(-1.2), phi(-1.2)])   # [0.691462, 0.115070, 0.115070]
    torch.testing.assert_close(load, expected, rtol=1e-5, atol=1e-6)


def test_shazeer_load_k_equals_E_and_no_noise():
    clean = torch.randn(5, 3)
    # k == E: every expert is always selected -> Load_i = T
    torch.testing.assert_close(L.shazeer_load(clean, clean + 0.1, torch.ones(5, 3), k=3), torch.full((3,), 5.0))
    # no noise: hard top-k counts. Rows' top-1: expert of argmax
    clean = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [5.0, 0.0, 0.0]])
    torch.testing.assert_close(L.shazeer_load(clean, clean, None, k=1), torch.tensor([2.0, 1.0, 0.0]))
    torch.testing.assert_close(L.shazeer_load(clean, clean, torch.zeros(3, 3), k=2), torch.tensor([2.0, 3.0, 1.0]))


def test_vmoe_load_by_hand():
    # threshold = 1st largest noisy logit = 1.2; p_i = 1 - Φ((1.2 - clean_i)/1)
    # -> [1 - Φ(0.2), 1 - Φ(1.2), 1 - Φ(1.2)] = [0.420740, 0.115070, 0.115070]
    clean = torch.tensor([[1.0, 0.0, 0.0]])
    noisy = torch.tensor([[1.2, 0.5, -0.3]])
    load = L.vmoe_load(clean, noisy, 1.0, k=1)
    torch.testing.assert_close(load, torch.tensor([1 - phi(0.2), 1 - phi(1.2), 1 - phi(1.2)]), rtol=1e-5, atol=1e-6)
    assert L.vmoe_load_loss(clean, noisy, 1.0, 1).item() == pytest.approx(L.cv_squared(load).item())


def test_shazeer_load_gradient_reaches_both_gate_matrices():
    from moekit.routing import NoisyTopKRouter
    torch.manual_seed(0)
    r = NoisyTopKRouter(6, num_experts=4, top_k=2, w_importance=0.0, w_load=1.0)
    with torch.no_grad():   # zero init would make the first gradient step symmetric; perturb it
        r.gate.weight.normal_()
        r.noise.weight.normal_()
    r.train()
    d = r(torch.randn(32, 6))
    d.aux_loss.backward()
    assert r.gate.weight.grad is not None and r.gate.weight.grad.abs().sum() > 0
    assert r.noise.weight.grad is not None and r.noise.weight.grad.abs().sum() > 0
