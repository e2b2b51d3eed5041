"""V-MoE parity: the official test cases of google-research/vmoe (``vmoe/moe_test.py``,
``vmoe/nn/routing_test.py``), their inputs and expected values written out here by hand."""
import math

import pytest
import torch

from moekit import MoE, losses as L
from moekit.dispatch import capacity_mask, expert_capacity
from moekit.routing import TokenChoicePlan, build_router

# Official case: 3 items, 3 experts, k = 2, capacity 2 (GetTopExpertsPerItemDispatcherTest).
GATES = torch.tensor([[.4, .0, .2], [.5, .1, .4], [.3, .2, .6]])


def test_official_top_experts_per_item_vanilla_and_bpr():
    ids_TK = GATES.topk(2, dim=-1).indices                       # [[0, 2], [0, 2], [2, 0]]
    assert ids_TK.tolist() == [[0, 2], [0, 2], [2, 0]]
    # vanilla: token order; item 1's second choice (expert 2) and item 2's (expert 0) overflow
    vanilla = capacity_mask(ids_TK, 3, 2)
    assert vanilla.tolist() == [[True, True], [True, False], [True, False]]
    # BPR: items served by descending top gate (.6, .5, .4): item 0's second choice is dropped instead
    bpr = capacity_mask(ids_TK, 3, 2, priority_T=GATES.max(-1).values)
    assert bpr.tolist() == [[True, False], [True, True], [True, False]]


def test_official_capacity_rounding_multiple_of_4():
    # increase_to_multiple_of_4(ceil(32 * 2 * 1.0 / 32)) = 4; moekit's default keeps 2
    assert expert_capacity(32, 2, 32, 1.0, multiple_of=4) == 4
    assert expert_capacity(32, 2, 32, 1.0) == 2
    assert expert_capacity(10, 1, 4, 1.0, multiple_of=4) == 4         # ceil(2.5) = 3 -> 4
    with pytest.raises(ValueError, match="capacity_multiple_of"):
        MoE(8, 16, 4, capacity_factor=1.0, capacity_multiple_of=0)
    torch.manual_seed(0)
    rounded = MoE(8, 16, 4, top_k=1, capacity_factor=0.25, capacity_multiple_of=4).eval()
    plain = MoE(8, 16, 4, top_k=1, capacity_factor=0.25).eval()
    plain.load_state_dict(rounded.state_dict())
    x = torch.randn(16, 8)                 # C = ceil(16·0.25/4) = 1, rounded up to 4
    kept_rounded = 16 - rounded(x).metrics["dropped_assignments"].item()
    kept_plain = 16 - plain(x).metrics["dropped_assignments"].item()
    assert kept_plain == (plain(x).metrics["tokens_per_expert"] > 0).sum().item()      # one per used expert
    assert kept_rounded == rounded(x).metrics["tokens_per_expert"].clamp_max(4).sum().item() > kept_plain


# Official loss cases (NoisyTopExpertsPerItemRouterTest): 4 items, 3 experts.
LOSS_GATES = torch.tensor([[.5, .4, .1], [.3, .3, .4], [.1, .2, .7], [.8, .2, .0]])


def test_official_importance_gshard_and_load_values():
    # importance: sums [1.7, 1.1, 1.2], CV² = 0.03874999
    assert L.importance_loss(LOSS_GATES).item() == pytest.approx(0.03874999, abs=1e-6)
    # gshard: mean gates [1.7, 1.1, 1.2]/4, top-1 fractions [2, 0, 2]/4 -> E²·mean(m·g) = 1.0875
    assert L.gshard_aux_loss(LOSS_GATES.log(), LOSS_GATES.topk(1, -1).indices).item() == \
        pytest.approx(1.0875, abs=1e-6)
    # load: k = 2, noise std .1, given noise -> CV² of p_mean [0.999, 0.277, 0.234] = 0.48573864536489236
    logits = torch.tensor([[.9, .06, .04], [.7, .18, .12], [.85, .05, .1]], dtype=torch.float64)
    noise = torch.tensor([[-.037, .026, -.018], [-.074, .045, -.015], [-.067, -.059, .073]], dtype=torch.float64)
    assert L.vmoe_load_loss(logits, logits + noise, .1, 2).item() == pytest.approx(0.48573864536489236, abs=1e-6)


def _decision(gates_TE):
    logits = gates_TE.clamp_min(1e-30).log()
    w, ids = gates_TE.topk(2, dim=-1)
    return TokenChoicePlan(expert_ids=ids, weights=w, logits=logits, probs=gates_TE)


def test_losses_are_per_group_and_averaged():
    # Two groups: the official gates, and the same gates with the experts permuted. Each group has
    # importance CV² 0.03875; the whole batch looks balanced: sums [2.8, 2.3, 2.9] -> CV² = 0.0096875.
    both = torch.cat([LOSS_GATES, LOSS_GATES[:, [1, 2, 0]]])
    r = build_router("vmoe", 4, 3, w_importance=1.0, w_load=0.0)
    d = _decision(both)
    per_group = L.importance_loss_from_stats(d.statistics(group_size=4))
    whole = L.importance_loss_from_stats(d.statistics())
    assert per_group.item() == pytest.approx(0.03875, abs=1e-6)
    assert whole.item() == pytest.approx(0.0096875, abs=1e-6)


def test_layer_with_groups_averages_the_per_group_losses():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="vmoe", capacity_factor=1.0, group_size=6, w_z=1e-3).eval()
    x = torch.randn(18, 8)
    out = layer(x)
    parts = [layer(x[i:i + 6]) for i in range(0, 18, 6)]
    torch.testing.assert_close(out.aux_loss, sum(p.aux_loss for p in parts) / 3)
    for k in ("importance_loss", "z_loss"):
        torch.testing.assert_close(out.metrics[k], sum(p.metrics[k] for p in parts) / 3)


@pytest.mark.parametrize("router,opts", [("topk", {"renormalize": True}), ("topk", {"renormalize": False}),
                                         ("vmoe", {}), ("noisy_topk", {}), ("sigmoid", {})])
def test_bpr_orders_by_the_raw_top1_gate_whatever_the_renormalisation(router, opts):
    # top_k=1 and renormalised: every combine weight is 1.0, yet BPR must keep the confident token.
    # Two tokens choose expert 0; token 0 with a low top gate, token 1 with a high one; capacity 1.
    layer = MoE(2, 4, 2, top_k=1, router=router, router_options=opts or None, capacity_factor=0.5,
                batch_priority=True).eval()
    with torch.no_grad():
        layer.router.gate.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    x = torch.tensor([[0.6, 0.5], [3.0, 0.0]])      # token 0: logits (.6, .5) weak; token 1: (3, 0) strong
    out = layer(x)
    assert out.metrics["dropped_assignments"].item() == 1
    assert (out.y[0] == 0).all() and (out.y[1] != 0).any()     # token 0 dropped, token 1 kept
    layer.set_batch_priority(False)
    out = layer(x)
    assert (out.y[1] == 0).all() and (out.y[0] != 0).any()     # vanilla: token order
