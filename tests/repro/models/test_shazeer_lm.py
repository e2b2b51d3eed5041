"""ShazeerLM: wiring (hand-assembled forward), causality, ops and parameter counts, losses, errors.

Legend: B sequences, L time steps, V vocabulary, D model dim, E experts.
"""
import pytest
import torch

from moekit.repro.models.shazeer_lm import ShazeerLM, lstm_ops

B, L, V, D = 3, 7, 40, 16


def _ids(seed=0):
    return torch.randint(V, (B, L), generator=torch.Generator().manual_seed(seed))


def _models():
    torch.manual_seed(0)
    return {
        "moe": ShazeerLM(V, D, block="moe", num_experts=8, top_k=4),
        "hmoe": ShazeerLM(V, D, block="hmoe", num_groups=4, experts_per_group=4, top_k=2),
        "lstm": ShazeerLM(V, D, block="lstm", extra_lstm_layers=2),
        "wide": ShazeerLM(V, D, block="none", num_lstm_layers=1, lstm_hidden=4 * D),
    }


@pytest.mark.parametrize("kind", ["moe", "hmoe", "lstm", "wide"])
def test_forward_matches_hand_assembled_pipeline(kind):
    m = _models()[kind].eval()
    ids = _ids()
    out = m(ids)
    assert out.y.shape == (B, L, V)
    with torch.no_grad():
        h = m.lstms[0](m.embed(ids))[0]
        if m.middle is not None:
            h = h + m.middle(h).y               # the MoE sees every time step of every sequence
        for lstm in [*m.middle_lstms, *m.lstms[1:]]:
            h = h + lstm(h)[0]
        ref = m.head(h)
    torch.testing.assert_close(out.y, ref)


@pytest.mark.parametrize("kind", ["moe", "hmoe", "lstm", "wide"])
def test_causal_each_step_sees_only_the_past(kind):
    m = _models()[kind].eval()
    ids = _ids()
    t = 3
    changed = ids.clone()
    changed[:, t + 1:] = (changed[:, t + 1:] + 1) % V
    with torch.no_grad():
        a, b = m(ids).y, m(changed).y
    torch.testing.assert_close(a[:, : t + 1], b[:, : t + 1])
    assert not torch.allclose(a[:, t + 1:], b[:, t + 1:])


def test_moe_routes_every_time_step_and_aux_loss():
    ms = _models()
    ids = _ids()
    for kind in ("moe", "hmoe"):
        m = ms[kind].train()
        out = m(ids)
        # every (sequence, time step) token sends 4 assignments (flat k=4; hierarchical 2 groups × 2)
        assert out.metrics["tokens_per_expert"].sum().item() == B * L * 4
        assert out.aux_loss.dim() == 0 and torch.isfinite(out.aux_loss) and out.aux_loss.item() >= 0
    for kind in ("lstm", "wide"):
        out = ms[kind](ids)
        assert out.aux_loss.item() == 0.0 and out.metrics == {}


def test_loss_is_next_token_cross_entropy_and_reaches_every_part():
    m = _models()["moe"].train()
    ids = _ids()
    x, y = ids[:, :-1], ids[:, 1:]
    torch.manual_seed(1)
    ce, aux, metrics = m.loss(x, y)
    torch.manual_seed(1)
    logits = m(x).y
    torch.testing.assert_close(ce, torch.nn.functional.cross_entropy(logits.reshape(-1, V), y.reshape(-1)))
    (ce + aux).backward()
    assert m.middle.experts.w1.grad.abs().sum() > 0
    assert m.lstms[0].weight_ih_l0.grad.abs().sum() > 0
    # zero-initialised gates get a gradient through the balancing losses and the gate values
    assert m.middle.router.noise.weight.grad.abs().sum() > 0


def test_ops_per_timestep_hand_counted():
    d = 64
    one = 4 * d * (d + d)                                          # one LSTM-64 step: 4 gates over [x, h]
    assert lstm_ops(d, d) == one == 32768
    expert = 2 * d * (2 * d)                                       # 64 -> 128 -> 64
    c = ShazeerLM(256, d, block="lstm").cost()
    assert c.ops_per_timestep == 4 * one and c.gate_ops == c.expert_ops == 0
    c = ShazeerLM(256, d, block="moe", num_experts=32, top_k=4).cost()
    assert (c.lstm_ops, c.gate_ops, c.expert_ops) == (2 * one, d * 32, 4 * expert)
    assert c.ops_per_timestep == 2 * one + d * 32 + 4 * expert
    c = ShazeerLM(256, d, block="hmoe", num_groups=16, experts_per_group=16, top_k=2).cost()
    assert (c.gate_ops, c.expert_ops) == (d * 16 + 2 * d * 16, 4 * expert)   # primary + 2 chosen groups
    c = ShazeerLM(256, d, block="none", num_lstm_layers=1, lstm_hidden=4 * d).cost()
    assert c.lstm_ops == 4 * (4 * d) * (d + d) + 4 * d * d            # gates over [x, projected h] + projection
    assert c.softmax_ops == d * 256


def test_compute_matched_and_parameter_counts():
    d = 64
    dense = ShazeerLM(256, d, block="lstm").cost().ops_per_timestep
    for kw in (dict(block="moe", num_experts=4), dict(block="moe", num_experts=256),
               dict(block="hmoe", num_groups=32, experts_per_group=32, top_k=2),
               dict(block="none", num_lstm_layers=1, lstm_hidden=4 * d)):
        m = ShazeerLM(256, d, **kw)
        c = m.cost()
        assert abs(c.ops_per_timestep - dense) / dense < 0.15, kw
        assert c.params_total == sum(p.numel() for p in m.parameters())
        if m.middle is not None:
            per_expert = 2 * d * 2 * d
            assert c.params_active == c.params_total - (m.num_experts - 4) * per_expert
        else:
            assert c.params_active == c.params_total
    big = ShazeerLM(256, d, block="moe", num_experts=256).cost()
    assert big.params_total > 20 * big.params_active        # capacity at (nearly) the same compute


def test_lstm_projection_shape():
    m = ShazeerLM(V, D, block="none", num_lstm_layers=1, lstm_hidden=4 * D)
    assert m.lstms[0].hidden_size == 4 * D and m.lstms[0].proj_size == D
    assert ShazeerLM(V, D, block="lstm").lstms[0].proj_size == 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(block="mlp"), "block"),
    (dict(block="moe", num_experts=4, top_k=5), "top_k"),
    (dict(block="hmoe", num_groups=4), "experts_per_group"),
    (dict(block="none", lstm_hidden=8), "lstm_hidden"),
    (dict(dropout=1.0), "dropout"),
    (dict(dim=0), "dim"),
])
def test_bad_arguments(kwargs, match):
    kw = dict(vocab_size=V, dim=D)
    kw.update(kwargs)
    with pytest.raises(ValueError, match=match):
        ShazeerLM(**kw)


def test_bad_input():
    m = _models()["lstm"]
    with pytest.raises(TypeError, match="ids"):
        m(torch.zeros(B, L))
    with pytest.raises(ValueError, match="ids"):
        m(torch.zeros(B, L, 2, dtype=torch.long))


def test_learns_a_repeating_sequence():
    torch.manual_seed(0)
    m = ShazeerLM(V, D, block="moe", num_experts=8, top_k=4)
    seq = torch.arange(12).repeat(3)[None].expand(4, -1) % V
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    first = None
    for _ in range(60):
        ce, aux, _ = m.loss(seq[:, :-1], seq[:, 1:])
        first = ce.item() if first is None else first
        opt.zero_grad()
        (ce + aux).backward()
        opt.step()
    assert ce.item() < 0.3 * first
