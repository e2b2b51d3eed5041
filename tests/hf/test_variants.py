"""The routing and expert variants current MoE language models need, on the fast grouped path:
each against the reference dispatch and against a per-token loop written from the formula.

Legend: T tokens, D model dim, E experts, K experts per token, H expert hidden dim.
"""
import pytest
import torch
from torch import nn

from moekit import MoE
from moekit.routing import ScoredTopKRouter

D, H, E = 6, 5, 8


def _pair(**kw):
    torch.manual_seed(0)
    fast = MoE(D, H, E, **kw)
    ref = MoE(D, H, E, dispatch="reference", **kw)
    ref.load_state_dict(fast.state_dict())
    with torch.no_grad():                          # non-zero biases and gates so every term is exercised
        for p_fast, p_ref in zip(fast.parameters(), ref.parameters()):
            if p_fast.dim() <= 2 and torch.count_nonzero(p_fast) == 0:
                p_fast.normal_()
                p_ref.copy_(p_fast)
    return fast, ref


VARIANTS = {
    "router_bias": dict(router="scored", top_k=2, router_options={"bias": True}),
    "sigmoid_groups": dict(router="scored", top_k=2, router_options={
        "score": "sigmoid", "selection_bias": True, "n_group": 4, "topk_group": 2, "scale": 2.5}),
    "softmax_selection_bias": dict(router="scored", top_k=2, router_options={"selection_bias": True,
                                                                              "norm_min": 1e-12}),
    "pnorm": dict(router="scored", top_k=3, router_options={"renormalize": 2.0}),
    "input_gating": dict(router="scored", top_k=2, gate_input=True,
                         router_options={"score": "sigmoid", "renormalize": False}),
    "gated_shared": dict(router="topk", top_k=2, num_shared_experts=1, shared_hidden_dim=7, shared_gate=True),
    "gptoss_glu": dict(router="scored", top_k=2, router_options={"bias": True},
                       expert_options={"bias": True, "alpha": 1.702, "limit": 0.3, "up_offset": 1.0}),
    "absolute_capacity": dict(router="switch", capacity=2, group_size="sequence",
                              router_options={"w_switch": 0.0}),
}


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_matches_reference_dispatch(name, same_forward_backward):
    fast, ref = _pair(**VARIANTS[name])
    if fast.router.__dict__.get("_buffers", {}).get("expert_bias") is not None:
        torch.manual_seed(1)
        fast.router.expert_bias.normal_(0, 0.1)
        ref.router.expert_bias.copy_(fast.router.expert_bias)
    o1, _ = same_forward_backward(fast, ref, torch.randn(3, 5, D))
    assert torch.isfinite(o1.aux_loss)


def _glu_expert(layer, e, x_D):
    ex = layer.experts
    h = x_D @ ex.w_in[e] + (ex.b_in[e] if ex.b_in is not None else 0)
    g, u = h.chunk(2)
    if ex.limit is not None:
        g, u = g.clamp(max=ex.limit), u.clamp(-ex.limit, ex.limit)
    a = g * torch.sigmoid((ex.alpha or 1.0) * g)
    return (a * (u + ex.up_offset)) @ ex.w_out[e] + (ex.b_out[e] if ex.b_out is not None else 0)


def test_group_limited_selection_by_hand():
    """DeepSeek-V3's rule: groups ranked by the sum of their two best corrected scores, top-k among the
    experts of the topk_group best groups, weights = uncorrected sigmoid scores, normalised, scaled."""
    torch.manual_seed(0)
    r = ScoredTopKRouter(D, E, 3, score="sigmoid", selection_bias=True, n_group=4, topk_group=2, scale=2.5)
    r.expert_bias.normal_(0, 0.2)
    x = torch.randn(40, D)
    d = r.route(x)
    s = torch.sigmoid(x @ r.gate.weight.t())
    for t in range(40):
        c = s[t] + r.expert_bias
        group_score = [sorted(c[g * 2:(g + 1) * 2].tolist(), reverse=True)[:2] for g in range(4)]
        best_groups = sorted(range(4), key=lambda g: -sum(group_score[g]))[:2]
        eligible = [e for e in range(E) if e // 2 in best_groups]
        chosen = sorted(eligible, key=lambda e: -c[e].item())[:3]
        assert sorted(d.expert_ids[t].tolist()) == sorted(chosen)
        w = s[t, d.expert_ids[t]]
        torch.testing.assert_close(d.weights[t], 2.5 * w / w.sum())


def test_group_limited_selection_changes_the_choice():
    torch.manual_seed(0)
    free = ScoredTopKRouter(D, E, 2, score="sigmoid")
    grouped = ScoredTopKRouter(D, E, 2, score="sigmoid", n_group=4, topk_group=1)
    grouped.load_state_dict(free.state_dict())
    x = torch.randn(200, D)
    ids = grouped.route(x).expert_ids
    assert (ids[:, 0] // 2 == ids[:, 1] // 2).all()           # one group: both experts from it
    assert (free.route(x).expert_ids // 2).unique(dim=0).shape[0] > 0
    assert not torch.equal(free.route(x).expert_ids.sort(-1).values, ids.sort(-1).values)


def test_pnorm_and_selection_bias_weights():
    torch.manual_seed(0)
    r = ScoredTopKRouter(D, E, 3, renormalize=2.0)
    x = torch.randn(10, D)
    d = r.route(x)
    p = torch.softmax(x @ r.gate.weight.t(), -1)
    w = p.gather(1, d.expert_ids)
    torch.testing.assert_close(d.weights, w / w.norm(dim=-1, keepdim=True))
    rb = ScoredTopKRouter(D, E, 2, selection_bias=True)
    rb.load_state_dict(r.state_dict(), strict=False)
    rb.expert_bias[5] = 10.0                                   # expert 5 always selected ...
    d = rb.route(x)
    assert (d.expert_ids == 5).any(-1).all()
    w = p.gather(1, d.expert_ids)                              # ... with its *uncorrected* probability
    torch.testing.assert_close(d.weights, w / w.sum(-1, keepdim=True))


def test_bias_update_and_option_errors():
    r = ScoredTopKRouter(D, 4, 2, selection_bias=True, bias_update_rate=0.5)
    r.update_bias(torch.tensor([4.0, 0.0, 2.0, 2.0]))
    torch.testing.assert_close(r.expert_bias, torch.tensor([-0.5, 0.5, 0.0, 0.0]))
    with pytest.raises(ValueError, match="update_bias"):
        ScoredTopKRouter(D, 4, 2).update_bias(torch.ones(4))
    with pytest.raises(ValueError, match="n_group"):
        ScoredTopKRouter(D, 6, 2, n_group=4)
    with pytest.raises(ValueError, match="topk_group"):
        ScoredTopKRouter(D, 8, 2, n_group=4, topk_group=5)
    with pytest.raises(ValueError, match="topk_group"):
        ScoredTopKRouter(D, 8, 3, n_group=4, topk_group=1)
    with pytest.raises(ValueError, match="score"):
        ScoredTopKRouter(D, 8, 2, score="relu")
    with pytest.raises(ValueError, match="renormalize"):
        ScoredTopKRouter(D, 8, 2, renormalize=-1)
    with pytest.raises(ValueError, match="alpha"):
        MoE(D, H, E, expert_options={"alpha": 1.0}, activation="gelu")
    with pytest.raises(ValueError, match="capacity"):
        MoE(D, H, E, capacity=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="shared_gate"):
        MoE(D, H, E, shared_gate=True)
    with pytest.raises(ValueError, match="gate_input"):
        MoE(D, H, E, router="soft", gate_input=True)


def test_gptoss_experts_input_gating_and_gated_shared_by_hand():
    fast, _ = _pair(**VARIANTS["gptoss_glu"])
    x = torch.randn(7, D)
    d = fast.router(x)
    y = fast(x).y
    for t in range(7):
        want = sum(d.weights[t, k] * _glu_expert(fast, d.expert_ids[t, k], x[t]) for k in range(2))
        torch.testing.assert_close(y[t], want, rtol=1e-5, atol=1e-6)

    fast, _ = _pair(**VARIANTS["input_gating"])
    d = fast.router(x)
    y = fast(x).y
    for t in range(7):
        want = sum(_glu_expert(fast, d.expert_ids[t, k], d.weights[t, k] * x[t]) for k in range(2))
        torch.testing.assert_close(y[t], want, rtol=1e-5, atol=1e-6)

    fast, _ = _pair(**VARIANTS["gated_shared"])
    no_shared = MoE(D, H, E, router="topk", top_k=2)
    no_shared.load_state_dict(fast.state_dict(), strict=False)
    h = x @ fast.shared.bank.w_in[0]
    g, u = h.chunk(2, -1)
    shared = (torch.nn.functional.silu(g) * u) @ fast.shared.bank.w_out[0]
    want = no_shared(x).y + torch.sigmoid(x @ fast.shared.gate.weight.t()) * shared
    torch.testing.assert_close(fast(x).y, want, rtol=1e-5, atol=1e-6)


def test_absolute_capacity_per_sequence_by_hand():
    """Switch Transformers' rule: within each sequence, expert e serves its first C tokens in order."""
    fast, _ = _pair(**VARIANTS["absolute_capacity"])
    x = torch.randn(3, 9, D)
    out = fast(x)
    d = fast.router(x.reshape(-1, D))
    ids = d.expert_ids[:, 0].view(3, 9)
    dense = fast.experts.forward_dense(x.reshape(-1, D)).view(E, 3, 9, -1)
    dropped = 0
    for b in range(3):
        seen = [0] * E
        for t in range(9):
            e = ids[b, t].item()
            seen[e] += 1
            if seen[e] <= 2:
                want = d.weights.view(3, 9)[b, t] * dense[e, b, t]
            else:
                want = torch.zeros(D)
                dropped += 1
            torch.testing.assert_close(out.y[b, t], want, rtol=1e-5, atol=1e-6)
    assert out.metrics["dropped_assignments"].item() == dropped > 0


class _LlamaStyleMLP(nn.Module):
    def __init__(self, d, h, bias=False):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, h, bias=bias), nn.Linear(d, h, bias=bias)
        self.down_proj = nn.Linear(h, d, bias=bias)
        self.act_fn = nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("kind", ["sequential", "gated", "gated_bias"])
def test_from_dense_equals_dense_at_init(kind):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(D, 11), nn.GELU(), nn.Linear(11, D)) if kind == "sequential" else \
        _LlamaStyleMLP(D, 11, bias=kind == "gated_bias")
    layer = MoE.from_dense(mlp, num_experts=4, top_k=2)
    x = torch.randn(2, 7, D)
    torch.testing.assert_close(layer(x).y, mlp(x), rtol=1e-5, atol=1e-6)
    noisy = MoE.from_dense(mlp, 4, 2, noise_std=0.1, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(noisy(x).y, mlp(x), atol=1e-4)
    unnormalised = MoE.from_dense(mlp, 4, 2, router="vmoe")    # top-k gates that do not sum to 1
    assert not torch.allclose(unnormalised.eval()(x).y, mlp(x), atol=1e-4)
    with pytest.raises(TypeError, match="mlp"):
        MoE.from_dense(nn.Linear(D, D), 4, 2)
    with pytest.raises(ValueError, match="activation"):
        MoE.from_dense(nn.Sequential(nn.Linear(D, 4), nn.GELU(approximate="tanh"), nn.Linear(4, D)), 4, 2)


@pytest.mark.parametrize("name", ["sigmoid_groups", "input_gating", "gated_shared", "gptoss_glu", "pnorm"])
def test_dropless_variants_trace_to_one_graph(name):
    """No host synchronisation on the new dropless paths: torch.compile sees one graph, no break."""
    torch.manual_seed(0)
    layer = MoE(D, H, E, **VARIANTS[name]).train()
    explain = torch._dynamo.explain(layer)(torch.randn(40, D))
    assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
    torch._dynamo.reset()
