"""Every registered router: forward+backward on odd shapes, determinism in eval, family specifics."""
import pytest
import torch

from moekit import MoE
from moekit.routing import (ROUTERS, ExpertChoiceRouter, NoisyTopKRouter, SigmoidRouter, SoftRouter, TopKRouter,
                            build_router)


@pytest.mark.parametrize("name", sorted(ROUTERS))
@pytest.mark.parametrize("T", [1, 7, 50])   # T=1; T not divisible by E; T > E
def test_every_router_forward_backward(name, T):
    torch.manual_seed(0)
    layer = MoE(6, 10, 4, router=name, expert="mlp")
    layer.train()
    x = torch.randn(T, 6, requires_grad=True)
    out = layer(x)
    assert out.y.shape == x.shape
    assert out.aux_loss.shape == () and torch.isfinite(out.aux_loss)
    assert torch.isfinite(out.y).all()
    (out.y.square().mean() + out.aux_loss).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for k, v in out.metrics.items():
        assert not v.requires_grad, k
        assert torch.isfinite(v).all(), k
    key = "slots_per_expert" if name == "soft" else "tokens_per_expert"
    assert out.metrics[key].shape == (4,)


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    layer = MoE(6, 10, 4, router=name, expert="glu").train()
    out = layer(torch.randn(2, 40, 6))
    (out.y.square().mean() + out.aux_loss).backward()
    for n, p in layer.named_parameters():
        if name == "noisy_topk" and n == "router.noise.weight":
            continue   # zero-initialised W_noise: its only gradient path is the load loss (checked in test_losses)
        assert p.grad is not None, n


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_eval_is_deterministic(name):
    torch.manual_seed(0)
    layer = MoE(6, 10, 4, router=name).eval()
    x = torch.randn(3, 9, 6)
    a, b = layer(x), layer(x)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)


def test_an_expert_with_no_tokens():
    torch.manual_seed(0)
    layer = MoE(4, 8, 3, top_k=1).eval()
    with torch.no_grad():
        layer.router.gate.weight.zero_()
        layer.router.gate.weight[0, 0] = 10.0
    x = torch.randn(10, 4).abs()          # x_0 > 0: everything goes to expert 0
    out = layer(x)
    assert out.metrics["tokens_per_expert"].tolist() == [10.0, 0.0, 0.0]
    assert out.metrics["experts_used"].item() == 1
    out.y.sum().backward()
    assert layer.experts.w_in.grad[1:].abs().sum() == 0


def test_noisy_topk_matches_the_paper():
    r = NoisyTopKRouter(5, num_experts=6, top_k=2)
    assert r.gate.weight.abs().sum() == 0 and r.noise.weight.abs().sum() == 0   # zero init
    with torch.no_grad():
        r.gate.weight.normal_()
        r.noise.weight.normal_()
    x = torch.randn(11, 5)
    r.eval()
    d = r(x)                                          # noise only in training
    # Renormalised softmax over the k survivors; others exactly zero
    top_vals, top_ids = d.logits.topk(2, dim=-1)
    torch.testing.assert_close(d.weights, torch.softmax(top_vals, -1))
    assert torch.equal(d.expert_ids, top_ids)
    gates = d.importance_gates()
    assert ((gates > 0).sum(-1) == 2).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(11))
    r.train()
    d = r(x, generator=torch.Generator().manual_seed(5))
    # H(x) = x W_g + ε · (softplus(x W_noise) + 1e-2), ε from the generator; G = softmax over the top k of H
    std = torch.nn.functional.softplus(x @ r.noise.weight.t()) + 1e-2
    h = x @ r.gate.weight.t() + torch.randn(11, 6, generator=torch.Generator().manual_seed(5)) * std
    top_vals, top_ids = h.topk(2, dim=-1)
    assert torch.equal(d.expert_ids, top_ids)
    torch.testing.assert_close(d.weights, torch.softmax(top_vals, -1))
    torch.testing.assert_close(d.logits, x @ r.gate.weight.t())          # the clean logits


def test_topk_options():
    torch.manual_seed(0)
    x = torch.randn(9, 5)
    ren = TopKRouter(5, 4, 2, renormalize=True).eval()
    raw = TopKRouter(5, 4, 2, renormalize=False).eval()
    raw.load_state_dict(ren.state_dict())
    torch.testing.assert_close(ren(x).weights.sum(-1), torch.ones(9))
    p = torch.softmax(raw(x).logits, -1)
    torch.testing.assert_close(raw(x).weights, p.topk(2, -1).values)     # V-MoE: not renormalised
    vm = TopKRouter(5, 4, 2, noise_std="1/E", renormalize=False, w_importance=0.005, w_load=0.005)
    assert vm.noise_std == 0.25
    d = vm.train()(x)
    assert {"importance_loss", "load_loss"} <= d.metrics.keys()
    with pytest.raises(ValueError, match="w_load"):
        TopKRouter(5, 4, 2, w_load=0.1)        # V-MoE load loss needs noise


def test_switch_is_top1_unrenormalised():
    layer = MoE(5, 8, 4, router="switch").eval()
    d = layer.router(torch.randn(6, 5))
    assert d.expert_ids.shape == (6, 1)
    torch.testing.assert_close(d.weights[:, 0], d.probs.max(-1).values)


def test_expert_choice_balanced_by_construction():
    torch.manual_seed(0)
    r = ExpertChoiceRouter(5, 4, capacity_factor=2.0).eval()
    d = r(torch.randn(10, 5))
    C = 5                                              # ceil(10 * 2 / 4)
    tok, exp, w = d.assignments()
    assert tok.numel() == 4 * C
    assert torch.bincount(exp, minlength=4).tolist() == [C] * 4
    torch.testing.assert_close(w, d.probs[tok, exp])
    torch.testing.assert_close(d.weight_A, w)


def test_sigmoid_bias_balancing_moves_load():
    torch.manual_seed(0)
    r = SigmoidRouter(5, 4, 1, bias_update_rate=0.01).eval()
    with torch.no_grad():
        r.gate.weight.normal_()
        r.gate.weight[0, 0] = 8.0
    x = torch.randn(400, 5).abs()

    def load():
        return torch.bincount(r(x).expert_ids[:, 0], minlength=4).float()

    start = load()
    assert start.max() / start.mean() > 2.5              # expert 0 hogs the tokens
    for _ in range(300):
        r.update_bias(load())
    end = load()
    assert end.max() / end.mean() < 1.3                  # balancing spread them out
    assert r.expert_bias[0] < 0
    # combine weights use the unbiased scores
    d = r(x)
    torch.testing.assert_close(d.weights, torch.ones(400, 1))   # normalised over k=1
    with pytest.raises(ValueError, match="tokens_per_expert"):
        r.update_bias(torch.ones(3))


def test_soft_router_weights_normalised():
    r = SoftRouter(5, 3, slots_per_expert=2)
    disp, comb, _ = r.slot_weights(torch.randn(2, 7, 5))
    torch.testing.assert_close(disp.sum(1), torch.ones(2, 6))
    torch.testing.assert_close(comb.sum(-1), torch.ones(2, 7))


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_router_refuses_nan(name):
    # sync-free check (torch._assert_async): raises at once on CPU, a device-side assert on GPU
    r = build_router(name, 3, 2)
    with pytest.raises(RuntimeError, match="NaN"):
        r(torch.tensor([[float("nan"), 0.0, 0.0]]))
    r_off = build_router(name, 3, 2, check_finite=False)     # opt-out: no check at all
    r_off(torch.tensor([[1.0, 0.0, 0.0]]))


def test_build_router_errors():
    with pytest.raises(ValueError, match="router"):
        build_router("nope", 4, 2)
    with pytest.raises(ValueError, match="top_k"):
        build_router("topk", 4, 2, 3)
    with pytest.raises(ValueError, match="top_k"):
        build_router("expert_choice", 4, 2, 1)
    with pytest.raises(ValueError, match="w_load"):
        build_router("sigmoid", 4, 2, w_load=0.1)
    with pytest.raises(ValueError, match="w_importance"):
        build_router("topk", 4, 2, w_importance=-1)


def test_gate_precision_compute_runs_the_gemm_in_the_compute_dtype():
    torch.manual_seed(0)
    exact = MoE(16, 32, 8, router="topk").to(torch.bfloat16)
    fast = MoE(16, 32, 8, router="topk", router_options={"gate_precision": "compute"}).to(torch.bfloat16)
    fast.load_state_dict(exact.state_dict())
    x = torch.randn(64, 16, dtype=torch.bfloat16)
    l_exact, l_fast = exact.router.logits(x), fast.router.logits(x)
    assert l_exact.dtype == l_fast.dtype == torch.float32          # routing itself stays float32
    want = x.float() @ exact.router.gate.weight.float().t()
    assert torch.equal(l_exact, want)                              # default: the GEMM in float32
    torch.testing.assert_close(l_fast, want, rtol=2e-2, atol=2e-2)  # bf16 operands
    assert fast.config.router.options["gate_precision"] == "compute"
    with pytest.raises(ValueError, match="gate_precision"):
        MoE(16, 32, 8, router_options={"gate_precision": "half"})
