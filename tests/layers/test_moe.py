"""The MoE layer: equivalences, shapes, shared experts, user experts, argument errors."""
import pytest
import torch
from torch import nn

from moekit import MoE, MoEOutput


@pytest.mark.parametrize("expert", ["mlp", "glu"])
def test_one_expert_equals_dense_mlp(expert):
    torch.manual_seed(0)
    layer = MoE(8, 16, 1, top_k=1, expert=expert).eval()
    x = torch.randn(4, 5, 8)
    bank = layer.experts
    if expert == "mlp":
        dense = nn.Sequential(nn.Linear(8, 16, bias=False), nn.GELU(), nn.Linear(16, 8, bias=False))
        with torch.no_grad():
            dense[0].weight.copy_(bank.w1[0].t())
            dense[2].weight.copy_(bank.w2[0].t())
        ref = dense(x)
    else:
        g, u = (x @ bank.w_in[0]).chunk(2, -1)
        ref = (torch.nn.functional.silu(g) * u) @ bank.w_out[0]
    out = layer(x)
    assert isinstance(out, MoEOutput)
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)


def test_any_leading_shape_and_dtype():
    layer = MoE(8, 16, 4)
    for shape in [(8,), (3, 8), (2, 3, 4, 8)]:
        assert layer(torch.randn(*shape)).y.shape == shape
    y = layer.to(torch.bfloat16)(torch.randn(5, 8, dtype=torch.bfloat16)).y
    assert y.dtype == torch.bfloat16


def test_aux_loss_is_zero_scalar_when_no_loss():
    out = MoE(8, 16, 4, router="topk", w_switch=0.0)(torch.randn(5, 8))
    assert out.aux_loss.shape == () and out.aux_loss.item() == 0.0
    out = MoE(8, 16, 4, router="soft")(torch.randn(5, 8))
    assert out.aux_loss is not None and out.aux_loss.item() == 0.0


def test_aux_loss_is_weighted_sum_of_reported_parts():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="topk", w_switch=0.02, w_z=0.003).train()
    out = layer(torch.randn(30, 8))
    expected = 0.02 * out.metrics["switch_loss"] + 0.003 * out.metrics["z_loss"]
    torch.testing.assert_close(out.aux_loss.detach(), expected)


def test_shared_experts_added_to_every_token():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, num_shared_experts=2, shared_hidden_dim=4).eval()
    base = MoE(8, 16, 4).eval()
    base.load_state_dict({k: v for k, v in layer.state_dict().items() if not k.startswith("shared")})
    x = torch.randn(6, 8)
    torch.testing.assert_close(layer(x).y, base(x).y + layer.shared.bank(x, torch.tensor([6])))
    torch.testing.assert_close(layer.shared(x), layer.shared.bank(x, torch.tensor([6])))
    assert layer.shared.bank.hidden_dim == 8 and layer.shared.hidden_dim == 4


def test_user_module_experts_match_stacked_bank():
    torch.manual_seed(0)
    layer = MoE(8, 16, 3, top_k=2, expert="mlp").eval()
    mods = []
    for e in range(3):
        m = nn.Sequential(nn.Linear(8, 16, bias=False), nn.GELU(), nn.Linear(16, 8, bias=False))
        with torch.no_grad():
            m[0].weight.copy_(layer.experts.w1[e].t())
            m[2].weight.copy_(layer.experts.w2[e].t())
        mods.append(m)
    custom = MoE(8, 16, 3, top_k=2, expert=mods).eval()
    custom.router.load_state_dict(layer.router.state_dict())
    x = torch.randn(9, 8)
    torch.testing.assert_close(custom(x).y, layer(x).y, rtol=1e-5, atol=1e-5)
    factory = MoE(8, 16, 3, expert=lambda: nn.Linear(8, 8))
    assert factory(x).y.shape == x.shape


def test_set_capacity_factor_at_eval():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, top_k=1).eval()
    x = torch.randn(40, 8)
    layer.set_capacity_factor(0.25)
    assert layer(x).metrics["dropped_assignments"].item() > 0
    layer.set_capacity_factor(None)
    assert layer(x).metrics["dropped_assignments"].item() == 0


def test_skipped_fraction_counts_tokens_that_lost_every_slot():
    # Route every token to experts 0 and 1 (k=2) by zeroing the router and biasing the logits through
    # the input: with E=4, T=8, k=2, c=0.5 the capacity is ceil(8*2*0.5/4) = 2 per expert, so experts 0
    # and 1 each serve the first 2 tokens (first choices first): tokens 0-1 get both slots, tokens 2-7 none.
    layer = MoE(4, 8, 4, top_k=2, router="topk", capacity_factor=0.5, router_options={"renormalize": False}).eval()
    with torch.no_grad():
        w = next(p for p in layer.router.parameters() if p.dim() == 2)   # (E, D) gate weight
        w.zero_()
        w[0, 0], w[1, 0] = 2.0, 1.0          # logits: expert 0 > expert 1 > experts 2, 3 for x[:, 0] > 0
    x = torch.zeros(8, 4)
    x[:, 0] = 1.0
    m = layer(x).metrics
    assert m["dropped_assignments"].item() == 12            # 16 assignments, 4 served
    assert m["dropped_fraction"].item() == pytest.approx(12 / 16)
    assert m["skipped_fraction"].item() == pytest.approx(6 / 8)
    assert m["skipped_tokens"].item() == 6


@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("expert", ["mlp", "glu"])
def test_capacity_layer_matches_dense_oracle(batch_priority, expert):
    # y_t = sum_k keep[t,k] * w[t,k] * expert_{e[t,k]}(x_t), with every expert run densely on every token
    # and keep[] from the (hand-tested) capacity rule: the layer must drop exactly those assignments.
    from moekit.dispatch import capacity_mask, expert_capacity
    torch.manual_seed(1)
    layer = MoE(8, 16, 4, top_k=2, expert=expert, capacity_factor=0.4, batch_priority=batch_priority).eval()
    x = torch.randn(30, 8, requires_grad=True)
    d = layer.router(x)
    C = expert_capacity(30, 2, 4, 0.4)
    # BPR serves tokens by the raw top-1 router probability (not the renormalised combine weight)
    keep_TK = capacity_mask(d.expert_ids, 4, C, d.probs.max(-1).values if batch_priority else None)
    assert (~keep_TK).any()
    dense_ETD = layer.experts.forward_dense(x)
    picked_TKD = dense_ETD[d.expert_ids, torch.arange(30)[:, None]]
    y_ref = (keep_TK[..., None] * d.weights[..., None] * picked_TKD).sum(1)
    y = layer(x).y
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    g, g_ref = torch.autograd.grad(y.square().sum(), x)[0], torch.autograd.grad(y_ref.square().sum(), x)[0]
    torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_group_size_routes_each_group_on_its_own(batch_priority):
    # capacity per group == running the layer on each group separately (router is deterministic in eval)
    torch.manual_seed(2)
    grouped = MoE(8, 16, 4, top_k=2, capacity_factor=0.5, batch_priority=batch_priority, group_size=10).eval()
    whole = MoE(8, 16, 4, top_k=2, capacity_factor=0.5, batch_priority=batch_priority).eval()
    whole.load_state_dict(grouped.state_dict())
    x = torch.randn(30, 8)
    out = grouped(x)
    parts = [whole(x[i:i + 10]) for i in range(0, 30, 10)]
    torch.testing.assert_close(out.y, torch.cat([p.y for p in parts]))
    assert out.metrics["dropped_assignments"].item() == sum(p.metrics["dropped_assignments"].item() for p in parts) > 0
    # one group of all tokens is the ungrouped layer
    grouped.group_size = 30
    torch.testing.assert_close(grouped(x).y, whole(x).y)


def test_group_size_errors():
    with pytest.raises(ValueError, match="group_size"):
        MoE(8, 16, 4, capacity_factor=1.0, group_size=0)
    with pytest.raises(ValueError, match="group_size"):
        MoE(8, 16, 4, router="expert_choice", group_size=4)
    # a last partial group is its own (smaller) group: equal to routing it on its own
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, capacity_factor=0.5, group_size=4).eval()
    x = torch.randn(6, 8)
    out = layer(x)
    torch.testing.assert_close(out.y[:4], layer(x[:4]).y)
    torch.testing.assert_close(out.y[4:], layer(x[4:]).y)


def test_set_batch_priority():
    layer = MoE(8, 16, 4, top_k=1, capacity_factor=0.5)
    layer.set_batch_priority(True)
    assert layer.batch_priority
    layer.set_batch_priority(False)
    layer.set_capacity_factor(None)
    with pytest.raises(ValueError, match="batch_priority"):
        layer.set_batch_priority(True)
    with pytest.raises(TypeError, match="batch_priority"):
        layer.set_batch_priority(1)


def test_vmoe_router_preset():
    layer = MoE(8, 16, 4, top_k=2, router="vmoe")
    r = layer.router
    assert (r.w_importance, r.w_load, r.w_switch, r.w_z) == (0.005, 0.005, 0.0, 0.0)
    assert r.noise_std == 0.25 and not r.renormalize
    torch.manual_seed(0)
    out = layer.train()(torch.randn(32, 8))
    expected = 0.005 * out.metrics["importance_loss"] + 0.005 * out.metrics["load_loss"]
    torch.testing.assert_close(out.aux_loss.detach(), expected)


@pytest.mark.parametrize("kwargs,arg", [
    (dict(top_k=5), "top_k"), (dict(top_k=0), "top_k"), (dict(router="magic"), "router"),
    (dict(capacity_factor=0), "capacity_factor"), (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(expert="transformer"), "expert"), (dict(dispatch="fast"), "dispatch"),
    (dict(batch_priority=True), "batch_priority"), (dict(router="soft", capacity_factor=1.0), "capacity_factor"),
    (dict(router=3), "router"),
])
def test_invalid_arguments_name_the_argument(kwargs, arg):
    with pytest.raises((ValueError, TypeError), match=arg):
        MoE(8, 16, 4, **kwargs)


def test_invalid_inputs():
    layer = MoE(8, 16, 4)
    with pytest.raises(ValueError, match="dim"):
        layer(torch.randn(3, 7))
    with pytest.raises(TypeError, match="floating"):
        layer(torch.ones(3, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x"):
        layer([[0.0] * 8])
    with pytest.raises(ValueError, match="hidden_dim"):
        MoE(8, 0, 4)
