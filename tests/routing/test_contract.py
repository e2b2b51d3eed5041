"""The router contract: routers declare their decision kind; user subclasses and newly registered
routers get the same treatment as the built-in ones; options are validated; noise takes a generator."""
import pytest
import torch

from moekit import MoE
from moekit.routing import ROUTERS, ExpertChoiceRouter, Router, TokenChoicePlan, build_router
from moekit.routing.plans import plan_kind


class TopOneByNorm(Router):
    """A new router written in one file: top-1 of softmax(x W), gate = its probability."""

    kind = "token_choice"
    default_weights = {"w_importance": 0.0, "w_load": 0.0, "w_switch": 1e-2, "w_z": 0.0}

    def __init__(self, dim, num_experts, top_k=1, **kwargs):
        super().__init__(dim, num_experts, top_k, **kwargs)

    def route(self, x_TD, *, mask_T=None, generator=None, group_size=None):
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, -1)
        w_TK, ids_TK = probs_TE.topk(self.top_k, -1)
        return TokenChoicePlan(expert_ids=ids_TK, weights=w_TK, logits=logits_TE, probs=probs_TE)


class MyExpertChoice(ExpertChoiceRouter):
    """A user's subclass of a built-in router (no new code: the kind is inherited)."""


@pytest.fixture
def registered(monkeypatch):
    monkeypatch.setitem(ROUTERS, "top1_norm", TopOneByNorm)
    monkeypatch.setitem(ROUTERS, "my_expert_choice", MyExpertChoice)
    return ["top1_norm", "my_expert_choice"]


@pytest.mark.parametrize("T", [1, 7, 50])
def test_registered_routers_forward_backward_and_match_reference(registered, T, same_forward_backward):
    for name in registered:
        torch.manual_seed(0)
        fast = MoE(6, 10, 4, router=name, expert="mlp").train()
        ref = MoE(6, 10, 4, router=name, expert="mlp", dispatch="reference").train()
        ref.load_state_dict(fast.state_dict())
        o1, _ = same_forward_backward(fast, ref, torch.randn(T, 6))
        for k, v in o1.metrics.items():
            assert not v.requires_grad and torch.isfinite(v).all(), (name, k)


def test_subclass_of_expert_choice_is_expert_choice():
    torch.manual_seed(0)
    base = MoE(6, 10, 4, router=ExpertChoiceRouter(6, 4, capacity_factor=1.0)).eval()
    sub = MoE(6, 10, 4, router=MyExpertChoice(6, 4, capacity_factor=1.0)).eval()
    sub.load_state_dict(base.state_dict())
    assert sub.kind == base.kind == "expert_choice"
    x = torch.randn(16, 6)
    ob, os_ = base(x), sub(x)          # used to crash with IndexError for the subclass
    torch.testing.assert_close(os_.y, ob.y)
    for k in ("dropped_assignments", "skipped_tokens", "skipped_fraction", "tokens_per_expert"):
        torch.testing.assert_close(os_.metrics[k], ob.metrics[k])
    # C = ceil(16·1/4) = 4 picks per expert, 16 assignments: tokens picked twice leave others unpicked
    assert ob.metrics["tokens_per_expert"].tolist() == [4.0, 4.0, 4.0, 4.0]


def test_kind_is_declared_and_checked():
    class Liar(TopOneByNorm):
        kind = "expert_choice"
    with pytest.raises(ValueError, match="kind"):
        Liar(4, 2)(torch.randn(3, 4))
    with pytest.raises(ValueError, match="plan"):
        plan_kind(object())                     # not a routing plan
    for name, cls in ROUTERS.items():
        assert cls.kind in ("token_choice", "expert_choice", "soft"), name


def test_unknown_router_option_lists_the_valid_ones():
    with pytest.raises(ValueError, match=r"noise_stdd.*valid options.*noise_std"):
        MoE(8, 16, 4, router="topk", router_options={"noise_stdd": 0.1})
    with pytest.raises(ValueError, match="slots_per_expert"):
        build_router("soft", 8, 4, slot_per_expert=2)


@pytest.mark.parametrize("name", ["noisy_topk", "topk", "vmoe"])
def test_noise_comes_from_the_generator(name):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=name, router_options={"noise_std": 0.5} if name == "topk" else None).train()
    if name == "noisy_topk":
        with torch.no_grad():
            layer.router.gate.weight.normal_()
            layer.router.noise.weight.normal_()
    x = torch.randn(64, 8)
    a = layer(x, generator=torch.Generator().manual_seed(1)).y
    torch.manual_seed(123)                       # the global RNG does not matter
    b = layer(x, generator=torch.Generator().manual_seed(1)).y
    c = layer(x, generator=torch.Generator().manual_seed(2)).y
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert not torch.equal(a, c)
