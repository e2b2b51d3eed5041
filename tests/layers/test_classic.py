"""Classic mixtures of experts: losses vs hand arithmetic, gradients vs the paper's closed forms, modules vs
slow explicit references. Legend: N examples, D input dim, O output dim, E experts, G groups, M per group."""
import math

import pytest
import torch

from moekit.layers.classic import (
    ClassicMoEOutput,
    HierarchicalMixtureOfExperts,
    MixtureOfLocalExperts,
    competitive_loss,
    cooperative_loss,
    expert_log_likelihood,
    gmm_nll,
    mixture_loss,
    posterior_responsibilities,
)


def _toy():
    # 2 experts, 1 example, O = 2: d = (1, 0), o_1 = (1, 0) (exact), o_2 = (0, 0) (||d − o_2||² = 1), p = (½, ½)
    gates_TE = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    outputs_NEO = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    target_TO = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    return gates_TE, outputs_NEO, target_TO


def _random(N=6, E=3, O=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits_NE = torch.randn(N, E, generator=g, dtype=torch.float64)
    outputs_NEO = torch.randn(N, E, O, generator=g, dtype=torch.float64)
    target_TO = torch.randn(N, O, generator=g, dtype=torch.float64)
    return logits_NE, outputs_NEO, target_TO


# ------------------------------------------------------------------------------------------------ losses

def test_losses_on_two_expert_toy_match_hand_arithmetic():
    gates, outs, d = _toy()
    # GMM: −ln(½·e^0 + ½·e^{−½}) = −ln(0.5 + 0.3032653) = −ln(0.8032653) = 0.2190702
    assert gmm_nll(gates, outs, d).item() == pytest.approx(0.2190702, abs=1e-6)
    # competitive: ½·0 + ½·1 = 0.5
    assert competitive_loss(gates, outs, d).item() == pytest.approx(0.5)
    # cooperative: blend = ½(1,0) + ½(0,0) = (0.5, 0); ||(1,0) − (0.5,0)||² = 0.25
    assert cooperative_loss(gates, outs, d).item() == pytest.approx(0.25)
    # responsibilities: (0.5, 0.3032653) / 0.8032653 = (0.6224593, 0.3775407)  (= sigmoid(±½))
    h = posterior_responsibilities(gates, outs, d)
    assert h[0].tolist() == pytest.approx([0.6224593, 0.3775407], abs=1e-6)


def test_gmm_with_learned_variance_matches_hand_arithmetic():
    gates, outs, d = _toy()
    # isotropic σ_1² = 1, σ_2² = 4, O = 2 dims, full Gaussian densities:
    #   log N_1 = −½(0 + 2·ln 1 + 2·ln 2π)          = −ln 2π                = −1.8378771
    #   log N_2 = −½(1/4 + 2·ln 4 + 2·ln 2π)       = −0.125 − ln 4 − ln 2π = −3.3491715
    #   p(d) = ½·e^{−1.8378771} + ½·e^{−3.3491714} = 0.0795775 + 0.0175567 = 0.0971342 → NLL = 2.3316619
    log_var_E1 = torch.tensor([[0.0], [math.log(4.0)]], dtype=torch.float64)
    ll = expert_log_likelihood(outs, d, log_var_E1)
    assert ll[0].tolist() == pytest.approx([-1.8378771, -3.3491714], abs=1e-6)
    assert gmm_nll(gates, outs, d, log_var_E1).item() == pytest.approx(2.3316619, abs=1e-6)
    # a diagonal variance equal in both dims gives the same value as the isotropic one
    log_var_EO = log_var_E1.expand(2, 2)
    assert gmm_nll(gates, outs, d, log_var_EO).item() == pytest.approx(2.3316619, abs=1e-6)


def test_reductions_and_log_gates_agree():
    logits, outs, d = _random()
    p, logp = torch.softmax(logits, -1), torch.log_softmax(logits, -1)
    for fn in (gmm_nll, competitive_loss, cooperative_loss):
        per_N = fn(p, outs, d, reduction="none")
        assert per_N.shape == (6,)
        assert fn(p, outs, d, reduction="sum").item() == pytest.approx(per_N.sum().item())
        assert fn(p, outs, d).item() == pytest.approx(per_N.mean().item())
        assert fn(logp, outs, d, gates_are_log=True).item() == pytest.approx(per_N.mean().item())


def test_gmm_is_stable_for_far_targets_and_sharp_gates():
    # every expert at squared distance 4000 from d, so E = −log Σ p_i e^{−2000} = 2000 exactly (Σ p_i = 1);
    # a naive exp underflows to 0 and gives inf.
    outs = torch.zeros(1, 3, 2)
    d = torch.tensor([[math.sqrt(2000.0), math.sqrt(2000.0)]])
    logp = torch.log_softmax(torch.tensor([[0.0, 200.0, -200.0]]), -1)  # exp(logp) has exact zeros
    loss = gmm_nll(logp, outs, d, gates_are_log=True)
    assert loss.item() == pytest.approx(2000.0)
    naive = -torch.log((logp.exp() * torch.exp(-0.5 * (d[:, None] - outs).pow(2).sum(-1))).sum(-1))
    assert torch.isinf(naive).all()
    logits = torch.tensor([[0.0, 200.0, -200.0]], requires_grad=True)
    gmm_nll(torch.log_softmax(logits, -1), outs, d, gates_are_log=True).backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------------ gradients

def test_gmm_gradients_match_closed_forms():
    # Jacobs et al. 1991: ∂E/∂o_i = −h_i (d − o_i), ∂E/∂s_i = p_i − h_i (per example; summed loss)
    logits, outs, d = _random(N=7, E=4, O=3)
    logits.requires_grad_(True)
    outs.requires_grad_(True)
    p = torch.softmax(logits, -1)
    loss = gmm_nll(p, outs, d, reduction="sum")
    g_s, g_o = torch.autograd.grad(loss, (logits, outs))
    with torch.no_grad():
        h = posterior_responsibilities(p, outs, d)
        torch.testing.assert_close(g_o, -h.unsqueeze(-1) * (d.unsqueeze(1) - outs))
        torch.testing.assert_close(g_s, p - h)


def test_gmm_gradients_with_learned_variance():
    # with σ_i²: ∂E/∂o_i = −h_i (d − o_i) / σ_i², ∂E/∂s_i = p_i − h_i, and for an isotropic log σ_i² = v_i
    # (O dims): ∂E/∂v_i = Σ_n −h_ni · ½(||d − o_i||² / σ_i² − O)
    logits, outs, d = _random(N=5, E=3, O=2, seed=1)
    log_var = torch.tensor([[0.3], [-0.5], [1.0]], dtype=torch.float64, requires_grad=True)
    logits.requires_grad_(True)
    outs.requires_grad_(True)
    logp = torch.log_softmax(logits, -1)
    loss = gmm_nll(logp, outs, d, log_var, gates_are_log=True, reduction="sum")
    g_s, g_o, g_v = torch.autograd.grad(loss, (logits, outs, log_var))
    with torch.no_grad():
        h = posterior_responsibilities(logp, outs, d, log_var, gates_are_log=True)
        var = log_var.exp().squeeze(-1)
        resid = d.unsqueeze(1) - outs
        torch.testing.assert_close(g_o, -h.unsqueeze(-1) * resid / var[None, :, None])
        torch.testing.assert_close(g_s, logp.exp() - h)
        want_v = (-h * 0.5 * (resid.pow(2).sum(-1) / var - 2)).sum(0)
        torch.testing.assert_close(g_v, want_v.unsqueeze(-1))


def test_competitive_and_cooperative_gradients_match_closed_forms():
    logits, outs, d = _random(N=5, E=3, O=2, seed=2)
    logits.requires_grad_(True)
    outs.requires_grad_(True)
    p = torch.softmax(logits, -1)
    # competitive E = Σ p_i ||d − o_i||²: ∂E/∂o_i = −2 p_i (d − o_i); ∂E/∂s_i = p_i (||d − o_i||² − E)
    E_N = competitive_loss(p, outs, d, reduction="none")
    g_s, g_o = torch.autograd.grad(E_N.sum(), (logits, outs))
    with torch.no_grad():
        resid = d.unsqueeze(1) - outs
        sq = resid.pow(2).sum(-1)
        torch.testing.assert_close(g_o, -2 * p.unsqueeze(-1) * resid)
        torch.testing.assert_close(g_s, p * (sq - E_N.unsqueeze(-1)))
    # cooperative E = ||d − y||², y = Σ p_j o_j: ∂E/∂o_i = −2 p_i (d − y); ∂E/∂s_i = p_i (a_i − Σ_j p_j a_j),
    # a_i = −2 (d − y)·o_i
    p = torch.softmax(logits, -1)
    g_s, g_o = torch.autograd.grad(cooperative_loss(p, outs, d, reduction="sum"), (logits, outs))
    with torch.no_grad():
        y = (p.unsqueeze(-1) * outs).sum(1)
        a = -2 * ((d - y).unsqueeze(1) * outs).sum(-1)
        torch.testing.assert_close(g_o, -2 * p.unsqueeze(-1) * (d - y).unsqueeze(1))
        torch.testing.assert_close(g_s, p * (a - (p * a).sum(-1, keepdim=True)))


def test_gradcheck_losses_float64():
    logits, outs, d = _random(N=3, E=3, O=2, seed=3)
    log_var = torch.randn(3, 2, dtype=torch.float64) * 0.3
    inputs = [t.clone().requires_grad_(True) for t in (logits, outs, d, log_var)]

    def f(s, o, t, v):
        logp = torch.log_softmax(s, -1)
        return (gmm_nll(logp, o, t, v, gates_are_log=True), gmm_nll(logp, o, t, gates_are_log=True),
                competitive_loss(logp, o, t, gates_are_log=True), cooperative_loss(logp, o, t, gates_are_log=True))

    assert torch.autograd.gradcheck(f, inputs)


def test_gradcheck_modules_float64():
    torch.manual_seed(0)
    x = torch.randn(4, 3, dtype=torch.float64)
    t = torch.randn(4, 2, dtype=torch.float64)
    for m in (MixtureOfLocalExperts(3, 2, 2, expert="mlp", expert_hidden=2, gate="mlp", gate_hidden=2,
                                    learn_variance="diagonal").double(),
              HierarchicalMixtureOfExperts(3, 2, 2, 2, learn_variance=True).double()):
        params = list(m.parameters())

        def f(*ps, m=m):
            out = torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))
            return m.loss(out, t)

        assert torch.autograd.gradcheck(f, [p.detach().clone().requires_grad_(True) for p in params])


# ------------------------------------------------------------------------------------------------ modules

def _explicit_mixture(m: MixtureOfLocalExperts, x_ND):
    """Slow reference: each expert and the gate evaluated one by one from the stacked weights."""
    def net(stack, c, x):
        h = x @ stack.weight_CDO[c] + stack.bias_CO[c]
        if stack.hidden is None:
            return h
        return torch.tanh(h) @ stack.weight2_CHO[c] + stack.bias2_CO[c]

    logits = net(m.gate, 0, x_ND)
    p = torch.softmax(logits, -1)
    outs = torch.stack([net(m.experts, e, x_ND) for e in range(m.num_experts)], 1)
    return p, outs


@pytest.mark.parametrize("expert,gate", [("linear", "linear"), ("mlp", "mlp"), (None, "mlp")])
def test_mixture_forward_matches_explicit_reference(expert, gate):
    torch.manual_seed(1)
    m = MixtureOfLocalExperts(3, 2, 4, expert=expert, expert_hidden=5, gate=gate, gate_hidden=6)
    x = torch.randn(8, 3)
    out = m(x)
    p, outs = _explicit_mixture(m, x)
    torch.testing.assert_close(out.gates, p)
    torch.testing.assert_close(out.expert_outputs, outs)
    torch.testing.assert_close(out.y, (p.unsqueeze(-1) * outs).sum(1))
    t = torch.randn(8, 2)
    # explicit −log Σ_i p_i exp(−½||d − o_i||²), mean over examples
    want = -torch.log((p * torch.exp(-0.5 * (t.unsqueeze(1) - outs).pow(2).sum(-1))).sum(-1)).mean()
    torch.testing.assert_close(m.loss(out, t), want)


def test_argmax_output_is_the_most_probable_experts_output():
    torch.manual_seed(2)
    m = MixtureOfLocalExperts(2, 3, 5, output="argmax")
    out = m(torch.randn(10, 2))
    for n in range(10):
        torch.testing.assert_close(out.y[n], out.expert_outputs[n, out.gates[n].argmax()])
    assert torch.equal(out.expert_ids, out.gates.argmax(-1))


def test_leading_dims_are_supported():
    torch.manual_seed(3)
    m = MixtureOfLocalExperts(2, 3, 4)
    x = torch.randn(2, 5, 2)
    out = m(x)
    assert out.y.shape == (2, 5, 3) and out.gates.shape == (2, 5, 4) and out.expert_outputs.shape == (2, 5, 4, 3)
    flat = m(x.reshape(10, 2))
    torch.testing.assert_close(out.y.reshape(10, 3), flat.y)


def test_one_expert_mixture_equals_the_plain_expert():
    torch.manual_seed(4)
    m = MixtureOfLocalExperts(3, 2, 1)
    plain = torch.nn.Linear(3, 2)
    with torch.no_grad():
        plain.weight.copy_(m.experts.weight_CDO[0].T)
        plain.bias.copy_(m.experts.bias_CO[0])
    x, t = torch.randn(6, 3), torch.randn(6, 2)
    out = m(x)
    torch.testing.assert_close(out.gates, torch.ones(6, 1))
    torch.testing.assert_close(out.y, plain(x))
    # p = 1: −log(1·exp(−½||d − o||²)) = ½||d − o||², and competitive = cooperative = ||d − o||²
    half_sq = 0.5 * (t - plain(x)).pow(2).sum(-1).mean()
    torch.testing.assert_close(m.loss(out, t), half_sq)
    for kind in ("competitive", "cooperative"):
        torch.testing.assert_close(mixture_loss(kind, out.gates, out.expert_outputs, t), 2 * half_sq)


def test_custom_expert_factory():
    torch.manual_seed(5)
    m = MixtureOfLocalExperts(3, 2, 3, expert=lambda i, o: torch.nn.Sequential(torch.nn.Linear(i, o)))
    x = torch.randn(4, 3)
    out = m(x)
    want = torch.stack([e(x) for e in m.experts.experts], 1)
    torch.testing.assert_close(out.expert_outputs, want)


def test_hierarchical_with_one_group_equals_flat():
    torch.manual_seed(6)
    flat = MixtureOfLocalExperts(3, 2, 4, gate="mlp", gate_hidden=5, learn_variance="diagonal")
    hme = HierarchicalMixtureOfExperts(3, 2, num_groups=1, experts_per_group=4, gate="mlp", gate_hidden=5,
                                       learn_variance="diagonal")
    with torch.no_grad():
        for name, p in flat.experts.named_parameters():
            dict(hme.experts.named_parameters())[name].copy_(p)
        for name, p in flat.gate.named_parameters():
            dict(hme.group_gates.named_parameters())[name].copy_(p)
        flat.log_var_EO.normal_()
        hme.log_var_EO.copy_(flat.log_var_EO)
    x, t = torch.randn(7, 3), torch.randn(7, 2)
    a, b = flat(x), hme(x)
    torch.testing.assert_close(b.group_gates, torch.ones(7, 1))
    torch.testing.assert_close(a.gates, b.gates)
    torch.testing.assert_close(a.y, b.y)
    torch.testing.assert_close(flat.loss(a, t), hme.loss(b, t))


def test_hierarchical_likelihood_is_the_nested_sum():
    # p(t|x) = Σ_i g_i Σ_j g_{j|i} exp(−½||t − o_ij||²), written out with loops
    torch.manual_seed(7)
    G, M = 3, 2
    hme = HierarchicalMixtureOfExperts(2, 2, G, M)
    x, t = torch.randn(5, 2), torch.randn(5, 2)
    out = hme(x)
    g_top = torch.softmax(x @ hme.top_gate.weight_CDO[0] + hme.top_gate.bias_CO[0], -1)
    torch.testing.assert_close(out.group_gates, g_top)
    for n in range(5):
        lik = 0.0
        for i in range(G):
            g_within = torch.softmax(x[n] @ hme.group_gates.weight_CDO[i] + hme.group_gates.bias_CO[i], -1)
            for j in range(M):
                o = x[n] @ hme.experts.weight_CDO[i * M + j] + hme.experts.bias_CO[i * M + j]
                lik = lik + g_top[n, i] * g_within[j] * torch.exp(-0.5 * (t[n] - o).pow(2).sum())
        torch.testing.assert_close(hme.loss(out, t, reduction="none")[n], -torch.log(lik))
    torch.testing.assert_close(out.gates.sum(-1), torch.ones(5))
    h_G = out.group_responsibilities(t)
    torch.testing.assert_close(h_G, out.responsibilities(t).reshape(5, G, M).sum(-1))


def test_reset_parameters_with_generator_is_reproducible():
    a = MixtureOfLocalExperts(2, 3, 4, expert="mlp", learn_variance=True)
    b = MixtureOfLocalExperts(2, 3, 4, expert="mlp", learn_variance=True)
    a.reset_parameters(torch.Generator().manual_seed(11))
    b.reset_parameters(torch.Generator().manual_seed(11))
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_mixture_density_network_learns_a_two_branch_target():
    # t = ±2x + 0.1·noise (branch by coin flip), x ~ U(−1, 1). The best unimodal Gaussian (mean 0, variance
    # E[4x²] + 0.01 = 1.343) has NLL ½ln(2πe·1.343) = 1.57; a 2-expert mixture with learned variance finds both
    # branches: NLL → ln 2 + ½ln(2πe·0.01) = 0.693 − 0.882 = −0.19 (a bit lower where the branches overlap).
    g = torch.Generator().manual_seed(0)
    x = torch.rand(512, 1, generator=g) * 2 - 1
    sign = torch.randint(0, 2, (512, 1), generator=g) * 2 - 1
    t = 2 * sign * x + 0.1 * torch.randn(512, 1, generator=g)
    m = MixtureOfLocalExperts(1, 1, 2, learn_variance="isotropic")
    m.reset_parameters(torch.Generator().manual_seed(1))
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(200):
        loss = m.loss(m(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < -0.15
    slopes = sorted(m.experts.weight_CDO[:, 0, 0].tolist())
    assert slopes[0] == pytest.approx(-2.0, abs=0.2) and slopes[1] == pytest.approx(2.0, abs=0.2)
    sigma = m.log_var_EO.detach().exp().sqrt().flatten()
    assert ((sigma > 0.05) & (sigma < 0.2)).all()


def test_output_container():
    torch.manual_seed(8)
    out = MixtureOfLocalExperts(2, 2, 3, output="argmax")(torch.randn(4, 2))
    assert isinstance(out, ClassicMoEOutput)
    torch.testing.assert_close(out.blend, (out.gates.unsqueeze(-1) * out.expert_outputs).sum(1))
    with pytest.raises(ValueError, match="group_responsibilities"):
        out.group_responsibilities(torch.zeros(4, 2))


# ------------------------------------------------------------------------------------------------ bad input

@pytest.mark.parametrize("kwargs,arg", [
    (dict(num_experts=0), "num_experts"),
    (dict(in_dim=-1), "in_dim"),
    (dict(expert="cnn"), "expert"),
    (dict(gate="rbf"), "gate"),
    (dict(loss="mse"), "loss"),
    (dict(output="mean"), "output"),
    (dict(learn_variance="full"), "learn_variance"),
    (dict(learn_variance=True, loss="competitive"), "learn_variance"),
    (dict(expert_hidden=0), "expert_hidden"),
])
def test_bad_constructor_arguments_raise_value_error(kwargs, arg):
    base = dict(in_dim=2, out_dim=2, num_experts=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=arg):
        MixtureOfLocalExperts(**base)


def test_bad_types_and_shapes():
    with pytest.raises(TypeError, match="num_experts"):
        MixtureOfLocalExperts(2, 2, 2.0)
    with pytest.raises(ValueError, match="num_groups"):
        HierarchicalMixtureOfExperts(2, 2, 0, 2)
    with pytest.raises(ValueError, match="experts_per_group"):
        HierarchicalMixtureOfExperts(2, 2, 2, 0)
    m = MixtureOfLocalExperts(2, 2, 3)
    with pytest.raises(ValueError, match="x"):
        m(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="out"):
        m.loss(torch.zeros(4, 2), torch.zeros(4, 2))
    out = m(torch.zeros(4, 2))
    with pytest.raises(ValueError, match="target_TO"):
        m.loss(out, torch.zeros(4, 3))
    with pytest.raises(ValueError, match="reduction"):
        m.loss(out, torch.zeros(4, 2), reduction="avg")
    with pytest.raises(ValueError, match="gates_TE"):
        gmm_nll(torch.ones(4, 2), torch.zeros(4, 3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="log_var"):
        gmm_nll(torch.ones(4, 3) / 3, torch.zeros(4, 3, 2), torch.zeros(4, 2), torch.zeros(5, 2))
    with pytest.raises(ValueError, match="loss"):
        mixture_loss("hinge", torch.ones(4, 3) / 3, torch.zeros(4, 3, 2), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="log_var"):
        mixture_loss("competitive", torch.ones(4, 3) / 3, torch.zeros(4, 3, 2), torch.zeros(4, 2),
                     torch.zeros(3, 1))
