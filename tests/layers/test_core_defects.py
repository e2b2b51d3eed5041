"""Regression tests for defects of the layer found by probing, and the layer's configuration object."""
import math

import pytest
import torch

from moekit import MoE, MoEConfig, losses as L
from moekit.config import CapacityConfig, ExpertsConfig, RouterConfig, SharedConfig, first_difference
from moekit.routing import ROUTERS


# ---- capacity: no overflow ---------------------------------------------------------------------------
def test_huge_capacity_factor_drops_nothing():
    torch.manual_seed(0)
    big = MoE(8, 16, 4, capacity_factor=2e18).eval()          # finite: accepted, means "drop nothing"
    free = MoE(8, 16, 4).eval()
    free.load_state_dict(big.state_dict())
    x = torch.randn(30, 8)
    out = big(x)
    assert out.metrics["dropped_fraction"].item() == 0.0
    torch.testing.assert_close(out.y, free(x).y)


def test_absolute_capacity_out_of_range_is_refused_when_built():
    with pytest.raises(ValueError, match="capacity"):
        MoE(8, 16, 4, capacity=10 ** 30)
    layer = MoE(8, 16, 4, capacity=2 ** 40).eval()            # in range: works, drops nothing
    assert layer(torch.randn(10, 8)).metrics["dropped_assignments"].item() == 0.0


# ---- masked tokens count nowhere, whatever they hold ------------------------------------------------
@pytest.mark.parametrize("router", sorted(ROUTERS))
@pytest.mark.parametrize("check_finite", [True, False])
def test_nan_at_masked_positions_counts_nowhere(router, check_finite):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=router, w_z=1e-3, router_options={"check_finite": check_finite}).eval()
    x = torch.randn(12, 8)
    mask = torch.ones(12, dtype=torch.bool)
    mask[[2, 7]] = False
    poisoned = x.clone()
    poisoned[~mask] = float("nan")
    out = layer(poisoned, mask=mask)
    clean = layer(x, mask=mask)
    torch.testing.assert_close(out.y, clean.y)
    assert torch.isfinite(out.aux_loss)
    for k, v in out.metrics.items():
        assert torch.isfinite(v).all(), k
        torch.testing.assert_close(v, clean.metrics[k], msg=k)


def test_a_group_of_padding_only_counts_in_no_loss():
    # 8 real tokens in groups of 4, plus 4 padding tokens: the all-padding third group must not count
    # in the mean over groups (it used to pull the loss down to exactly 2/3).
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="topk", group_size=4).eval()
    x = torch.randn(12, 8)
    mask = torch.arange(12) < 8
    padded = layer(x, mask=mask)
    real = layer(x[:8])
    torch.testing.assert_close(padded.aux_loss, real.aux_loss)
    torch.testing.assert_close(padded.metrics["switch_loss"], real.metrics["switch_loss"])


def test_group_mean_by_hand():
    # two groups of one token each; the second holds no real token
    from moekit.stats import RoutingStats
    stats = RoutingStats(num_tokens=torch.tensor([1.0, 0.0]), counts=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                         top1_counts=torch.tensor([[1.0, 0.0], [0.0, 0.0]]),
                         prob_sum=torch.tensor([[0.75, 0.25], [0.0, 0.0]]), importance=torch.zeros(2, 2),
                         z_sum=torch.tensor([4.0, 0.0]), top_k=1)
    assert L.switch_loss_from_stats(stats).item() == pytest.approx(2 * 0.75)     # E · f·P of group 0 only
    assert L.z_loss_from_stats(stats).item() == pytest.approx(4.0)


# ---- double backward ----------------------------------------------------------------------------------
@pytest.mark.parametrize("expert", ["glu", "mlp"])
@pytest.mark.parametrize("activation", ["silu", "gelu", "tanh"])
def test_double_backward_gradient_penalty(expert, activation):
    torch.manual_seed(0)
    layer = MoE(6, 8, 4, expert=expert, activation=activation, dispatch="sorted").double()
    ref = MoE(6, 8, 4, expert=expert, activation=activation, dispatch="reference").double()
    ref.load_state_dict(layer.state_dict())
    grads = []
    for m in (layer, ref):
        x = torch.randn(10, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
        (gx,) = torch.autograd.grad(m(x).y.square().sum(), x, create_graph=True)
        penalty = gx.square().sum()
        grads.append(torch.autograd.grad(penalty, [x, m.experts.parameters().__next__()]))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_glu_gradgradcheck():
    from moekit.experts.bank import glu
    h = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    for act in ("silu", "gelu", "tanh", "identity"):
        assert torch.autograd.gradgradcheck(lambda t: glu(t, act), (h,))


# ---- loss coefficients and noise must be finite ----------------------------------------------------
@pytest.mark.parametrize("name", ["w_switch", "w_importance", "w_z"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_loss_coefficients_must_be_finite_and_non_negative(name, value):
    with pytest.raises(ValueError, match=name):
        MoE(8, 16, 4, router="topk", **{name: value})


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -0.1, "1/e"])
def test_noise_std_must_be_finite(value):
    with pytest.raises(ValueError, match="noise_std"):
        MoE(8, 16, 4, router="topk", router_options={"noise_std": value})


# ---- the configuration object ------------------------------------------------------------------------
KEYWORDS = [
    dict(router="topk", capacity_factor=1.25, capacity_multiple_of=4, batch_priority=True),
    dict(router="noisy_topk", top_k=2, w_importance=0.2),
    dict(router="scored", router_options={"score": "sigmoid", "selection_bias": True, "n_group": 2,
                                          "topk_group": 1, "renormalize": 2.0}),
    dict(router="sigmoid", num_shared_experts=1, shared_gate=True),
    dict(router="switch", capacity=3, group_size="sequence"),
    dict(router="scored", gate_input=True, expert_options={"alpha": 1.702, "limit": 7.0, "up_offset": 1.0}),
    dict(router="expert_choice", capacity_factor=1.5),
    dict(router="soft", router_options={"slots_per_expert": 2}),
    dict(router="vmoe", expert="mlp", activation="gelu", bias=True, group_size=4),
]


@pytest.mark.parametrize("kw", KEYWORDS)
def test_from_config_rebuilds_the_same_layer(kw):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, **kw).eval()
    cfg = layer.config
    again = MoE.from_config(MoEConfig.from_dict(cfg.to_dict())).eval()
    assert again.config == cfg
    assert first_difference(cfg.to_dict(), again.config.to_dict()) is None
    again.load_state_dict(layer.state_dict())
    x = torch.randn(2, 6, 8)
    torch.testing.assert_close(again(x).y, layer(x).y)


def test_config_names_the_first_difference():
    a = MoE(8, 16, 4, router="scored", router_options={"score": "softmax"}).config.to_dict()
    b = MoE(8, 16, 4, router="scored", router_options={"score": "sigmoid"}).config.to_dict()
    assert first_difference(a, b) == "router.options.score"
    c = MoE(8, 16, 4, router="scored", expert_options={"limit": 7.0}).config.to_dict()
    assert first_difference(a, c) == "experts.options.limit"
    d = MoE(8, 16, 4, router="scored", num_shared_experts=1, shared_gate=True).config.to_dict()
    assert first_difference(a, d) == "shared.num_experts"


@pytest.mark.parametrize("bad, field", [
    (lambda: dict(capacity=CapacityConfig(factor=float("nan"))), "capacity_factor"),
    (lambda: dict(capacity=CapacityConfig(factor=2.0, absolute=3)), "capacity"),
    (lambda: dict(capacity=CapacityConfig(batch_priority=True)), "batch_priority"),
    (lambda: dict(capacity=CapacityConfig(multiple_of=0)), "capacity_multiple_of"),
    (lambda: dict(shared=SharedConfig(0, gated=True)), "shared_gate"),
    (lambda: dict(shared=SharedConfig(-1)), "num_shared_experts"),
    (lambda: dict(group_size=0), "group_size"),
    (lambda: dict(router=RouterConfig("topk", top_k=0)), "top_k"),
    (lambda: dict(experts=ExpertsConfig("glu", {"bias": object()})), "expert_options"),
])
def test_config_validates_each_field(bad, field):
    with pytest.raises((ValueError, TypeError), match=field):
        MoEConfig(dim=8, hidden_dim=16, num_experts=4, **bad())


def test_config_refuses_unknown_fields():
    d = MoE(8, 16, 4).config.to_dict()
    d["colour"] = "red"
    with pytest.raises(ValueError, match="colour"):
        MoEConfig.from_dict(d)


def test_forward_has_no_branch_on_the_routing_kind():
    import inspect
    from moekit.layers.moe import MoE as Layer
    src = inspect.getsource(Layer.forward)
    assert "kind" not in src and "soft" not in src and "expert_choice" not in src
    assert len([ln for ln in src.splitlines() if ln.strip() and not ln.strip().startswith("#")]) <= 20
