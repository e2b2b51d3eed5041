"""RoutingMonitor: per-layer statistics of every MoE layer of a model, checked against the routing
decisions recomputed by hand; markdown report with load heat-maps; transformers models after patch.

Legend: T tokens, D model dim, E experts, K experts per token, B batch, L sequence length, C capacity.
"""

import pytest
import torch
from torch import nn

from moekit import MoE
from moekit.analysis import RoutingMonitor

D = 8


class TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = MoE(D, 12, 4, 2)
        self.second = MoE(D, 12, 6, 1, router="switch", capacity_factor=0.5)

    def forward(self, x):
        return self.second(x + self.first(x).y).y


def test_monitor_counts_match_the_routing_decisions():
    torch.manual_seed(0)
    model = TwoLayers().eval()
    with torch.no_grad():
        model.first.router.gate.weight[3] = 0.0
        model.first.router.gate.weight[3, 0] = -50.0          # expert 3 of the first layer: never chosen
    xs = [torch.randn(5, D).abs() + 0.5 for _ in range(3)]
    with RoutingMonitor(model) as mon:
        for x in xs:
            model(x)
    assert set(mon.records) == {"first", "second"}
    rows = {r["layer"]: r for r in mon.summary()}
    first, second = rows["first"], rows["second"]
    assert first["steps"] == second["steps"] == 3
    # first layer: dropless top-2, counts from the router's own choices
    counts = torch.zeros(4)
    for x in xs:
        ids = model.first.router(x).expert_ids
        counts += torch.bincount(ids.reshape(-1), minlength=4)
    torch.testing.assert_close(mon.load_history("first").sum(0), counts)
    assert first["assignments"] == 3 * 5 * 2 and first["dropped_fraction"] == 0.0
    assert first["dead_experts"] == 1 and counts[3] == 0
    torch.testing.assert_close(torch.tensor(first["max_over_mean_load_total"]), counts.max() / counts.mean())
    # second layer: capacity 0.5 drops assignments; executed + dropped = all assignments
    assert second["assignments"] == 3 * 5
    assert 0 < second["dropped_fraction"] < 1
    assert mon.load_history("second").sum() == round(second["assignments"] * (1 - second["dropped_fraction"]))
    assert first["router_entropy"] > 0
    table = mon.table()
    assert table.count("\n") == 3 and "| first |" in table and "dead experts" in table
    model(xs[0])                                                # hooks removed on leaving the block
    assert mon.summary()[0]["steps"] == 3


def test_max_steps_reset_and_errors():
    model = TwoLayers()
    mon = RoutingMonitor(model, max_steps=2)
    for _ in range(4):
        model(torch.randn(3, D))
    assert all(len(v) == 2 for v in mon.records.values())
    mon.reset()
    assert mon.summary()[0]["steps"] == 0
    mon.remove()
    with pytest.raises(ValueError, match="model"):
        RoutingMonitor(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="max_steps"):
        RoutingMonitor(model, max_steps=0)
    with pytest.raises(KeyError, match="layer"):
        mon.load_history("nope")


def test_report_writes_markdown_and_heatmaps(tmp_path):
    pytest.importorskip("matplotlib")
    model = TwoLayers()
    mon = RoutingMonitor(model)
    for _ in range(4):
        model(torch.randn(6, D))
    path = mon.report(tmp_path)
    text = path.read_text()
    assert "| layer |" in text and "![load of first per step](load_00.png)" in text
    assert (tmp_path / "load_00.png").stat().st_size > 0 and (tmp_path / "load_01.png").exists()


def test_monitor_on_a_patched_transformers_model():
    pytest.importorskip("transformers")
    import transformers as tf

    import moekit.hf as mh
    cfg = tf.Qwen2MoeConfig(vocab_size=50, hidden_size=16, intermediate_size=12, num_hidden_layers=2,
                            num_attention_heads=2, num_key_value_heads=1, num_experts=4, num_experts_per_tok=2,
                            moe_intermediate_size=8, shared_expert_intermediate_size=8, decoder_sparse_step=1,
                            mlp_only_layers=[])
    torch.manual_seed(0)
    model = mh.patch(tf.Qwen2MoeForCausalLM(cfg).eval())
    mon = RoutingMonitor(model)
    ids = torch.randint(0, 50, (2, 9))
    model(input_ids=ids)
    model(input_ids=ids[:, :4])
    rows = mon.summary()
    assert [r["steps"] for r in rows] == [2, 2]
    assert all(r["assignments"] == (18 + 8) * 2 for r in rows)
    assert len(rows) == len(mh.patched_blocks(model))


# ---- padding: only real tokens are counted -----------------------------------------------------------

def _tiny_hf(family):
    import transformers as tf

    import moekit.hf as mh
    common = dict(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                  pad_token_id=0)
    if family == "qwen2_moe":
        cfg = tf.Qwen2MoeConfig(**common, intermediate_size=12, num_experts=4, num_experts_per_tok=2,
                                moe_intermediate_size=8, shared_expert_intermediate_size=8, decoder_sparse_step=1,
                                mlp_only_layers=[])
        cls = tf.Qwen2MoeForCausalLM
    else:
        cfg = tf.MixtralConfig(**common, intermediate_size=12, num_local_experts=4, num_experts_per_tok=2)
        cls = tf.MixtralForCausalLM
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    return mh.patch(cls(cfg).eval())


@pytest.mark.parametrize("family", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("side", ["right", "left"])
def test_patched_model_counts_only_real_tokens(family, side):
    pytest.importorskip("transformers")
    model = _tiny_hf(family)
    lengths = [7, 4, 5]
    L = max(lengths)
    torch.manual_seed(1)
    seqs = [torch.randint(1, 50, (n,)) for n in lengths]
    ids = torch.zeros(len(seqs), L, dtype=torch.long)
    mask = torch.zeros(len(seqs), L, dtype=torch.long)
    for b, s in enumerate(seqs):
        cols = slice(0, len(s)) if side == "right" else slice(L - len(s), L)
        ids[b, cols], mask[b, cols] = s, 1
    position_ids = (mask.cumsum(-1) - 1).clamp_min(0)
    # reference: every sequence alone, no padding at all
    with RoutingMonitor(model) as ref, torch.no_grad():
        for s in seqs:
            model(input_ids=s[None])
    ref_load = {n: ref.load_history(n).sum(0) for n in ref.records}
    with RoutingMonitor(model) as mon, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    real = sum(lengths)
    for row in mon.summary():
        assert row["steps"] == 1 and row["assignments"] == real * 2 and row["dropped_fraction"] == 0.0
        torch.testing.assert_close(mon.load_history(row["layer"])[0], ref_load[row["layer"]])
    # positional attention_mask is found too
    with RoutingMonitor(model) as pos, torch.no_grad():
        model(ids, mask, position_ids=position_ids)
    assert [r["assignments"] for r in pos.summary()] == [real * 2] * 2
    # without the mask the padding is counted (what the layers themselves report)
    with RoutingMonitor(model, capture_attention_mask=False) as raw, torch.no_grad():
        model(input_ids=ids, attention_mask=mask, position_ids=position_ids)
    assert [r["assignments"] for r in raw.summary()] == [ids.numel() * 2] * 2


def test_captured_mask_lasts_one_model_forward_and_follows_the_cache():
    pytest.importorskip("transformers")
    model = _tiny_hf("qwen2_moe")
    ids = torch.randint(1, 50, (2, 6))
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, :2] = 0                                              # left padding of the second sequence
    with RoutingMonitor(model) as mon, torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, use_cache=True)
        # one cached step: the mask covers past and new tokens, the layers see the new token only
        step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], -1)
        model(input_ids=ids[:, -1:], attention_mask=step_mask, past_key_values=out.past_key_values)
        model(input_ids=ids)                                     # no mask: every token is real
    for name in mon.records:
        totals = [int(r["total"]) for r in mon.records[name]]
        assert totals == [10 * 2, 2 * 2, 12 * 2]


def test_set_mask_on_own_layers_dropless_capacity_and_expert_choice():
    from moekit.dispatch import expert_capacity
    torch.manual_seed(0)
    B, L = 2, 6
    model = nn.ModuleDict({"drop": MoE(D, 12, 4, 2), "cap": MoE(D, 12, 4, 1, router="switch", capacity_factor=1.0),
                           "ec": MoE(D, 12, 4, None, router="expert_choice")}).eval()
    x = torch.randn(B, L, D)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 4:] = False
    mask[1, :3] = False
    real = mask.reshape(-1)
    mon = RoutingMonitor(model)
    with pytest.raises(TypeError, match="mask"):
        mon.set_mask(mask.float())
    mon.set_mask(mask)
    outs = {n: m(x) for n, m in model.items()}
    # dropless: the router's choices of the real tokens
    ids = model["drop"].router(x.reshape(-1, D)).expert_ids
    torch.testing.assert_close(mon.load_history("drop")[0], torch.bincount(ids[real].reshape(-1), minlength=4).float())
    assert int(mon.records["drop"][0]["total"]) == int(real.sum()) * 2
    # capacity: the padding took queue places in the layer; replay the queue token by token
    ids = model["cap"].router(x.reshape(-1, D)).expert_ids[:, 0]
    C = expert_capacity(B * L, 1, 4, 1.0)
    taken, load = [0] * 4, torch.zeros(4)
    for t in range(B * L):
        e = int(ids[t])
        if taken[e] < C:
            taken[e] += 1
            load[e] += float(real[t])
    torch.testing.assert_close(mon.load_history("cap")[0], load)
    rec = mon.records["cap"][0]
    assert int(rec["total"]) == int(real.sum()) and int(rec["dropped"]) == int(real.sum() - load.sum())
    # the same replay with every token real gives the layer's own count
    mon.set_mask(torch.ones(B, L, dtype=torch.bool))
    model["cap"](x)
    torch.testing.assert_close(mon.load_history("cap")[1], outs["cap"].metrics["tokens_per_expert"].float())
    # the same for top-2 capacity with Batch Priority Routing and with routing groups that need padding
    for layer in (MoE(D, 12, 4, 2, capacity_factor=1.0, batch_priority=True),
                  MoE(D, 12, 4, 2, capacity_factor=1.0, group_size=5)):
        with RoutingMonitor(layer.eval()) as one:
            one.set_mask(torch.ones(B, L, dtype=torch.bool))
            own = layer(x)
            torch.testing.assert_close(one.load_history("<model>")[0], own.metrics["tokens_per_expert"].float())
            assert int(one.records["<model>"][0]["dropped"]) == int(own.metrics["dropped_assignments"])
            one.set_mask(mask)
            layer(x)
            rec = one.records["<model>"][1]
            assert int(rec["total"]) == int(real.sum()) * 2
            assert int(rec["tokens_per_expert"].sum()) <= int(own.metrics["tokens_per_expert"].sum())
    # expert choice: the experts' picks that are real tokens
    d = model["ec"].router(x.reshape(-1, D))
    tok, exp, _ = d.assignments()
    torch.testing.assert_close(mon.load_history("ec")[0], torch.bincount(exp[real[tok]], minlength=4).float())
    # a layer called with its own mask is counted with it (the layer already left the padding out)
    mon.set_mask(torch.zeros(B, L, dtype=torch.bool))
    own = model["drop"](x, mask)
    torch.testing.assert_close(mon.load_history("drop")[-1], own.metrics["tokens_per_expert"].float())
    # flattened tokens: the mask's last columns are this forward's tokens (as after a cache)
    mon.set_mask(mask)
    model["drop"](x[:, -2:].reshape(-1, D))
    assert int(mon.records["drop"][-1]["total"]) == int(mask[:, -2:].sum()) * 2
    # a mask that fits no layer input is an error naming the mask
    mon.set_mask(torch.ones(3, L, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        model["drop"](x)
    mon.set_mask(None)
    model["drop"](x)
    assert int(mon.records["drop"][-1]["total"]) == B * L * 2
    mon.remove()
