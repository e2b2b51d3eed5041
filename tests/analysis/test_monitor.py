"""RoutingMonitor: per-layer statistics of every MoE layer of a model, checked against the routing
decisions recomputed by hand; markdown report with load heat-maps; transformers models after patch.

Legend: T tokens, D model dim, E experts, K experts per token.
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
