import math

import pytest
import torch

from moekit.analysis import dispatch_entropy, load_stats, routing_table


def test_routing_table_counts():
    ids = torch.tensor([0, 0, 1, 2, 2, 2])
    labels = torch.tensor([1, 1, 0, 0, 1, 1])
    assert routing_table(ids, labels, 3, 2).tolist() == [[0, 2], [1, 0], [1, 2]]


def test_routing_table_topk_counts_every_slot():
    ids_NK = torch.tensor([[0, 1], [1, 2]])
    assert routing_table(ids_NK, torch.tensor([0, 1]), 3, 2).tolist() == [[1, 0], [1, 1], [0, 1]]


def test_dispatch_entropy_by_hand():
    # expert 0 sees labels {0,1} equally (H = ln 2), expert 1 sees only label 2 (H = 0); weights 1/2, 1/2
    ids, labels = torch.tensor([0, 0, 1, 1]), torch.tensor([0, 1, 2, 2])
    assert dispatch_entropy(ids, labels, 2, 4) == pytest.approx(0.5 * math.log(2))
    # perfectly specialised -> 0; uniform mix of 4 clusters in one expert -> ln 4
    assert dispatch_entropy(torch.tensor([3, 1, 3]), torch.tensor([0, 2, 0]), 4, 4) == 0.0
    assert dispatch_entropy(torch.zeros(8, dtype=torch.long), torch.arange(8) % 4, 8, 4) == pytest.approx(math.log(4))


def test_load_stats():
    s = load_stats(torch.tensor([2.0, 2.0, 0.0, 4.0]))  # mean 2, std sqrt(2)
    assert s["cv"] == pytest.approx(math.sqrt(2) / 2)
    assert s["max_over_mean"] == 2.0 and s["experts_used"] == 3 and s["max_share"] == 0.5


@pytest.mark.parametrize("ids, labels, msg", [
    (torch.tensor([0.0]), torch.tensor([0]), "expert_ids_T"),
    (torch.tensor([0, 5]), torch.tensor([0, 0]), "expert_ids_T"),
    (torch.tensor([0, 1]), torch.tensor([0]), "sizes differ"),
    (torch.tensor([0]), torch.tensor([7]), "labels_T"),
])
def test_bad_input(ids, labels, msg):
    with pytest.raises((ValueError, TypeError), match=msg):
        routing_table(ids, labels, 2, 2)


def test_markdown_tables():
    from moekit.analysis.tables import markdown_table, routing_counts_markdown
    assert markdown_table(["a", "b"], [[1, 2.5]]) == "| a | b |\n|---|---|\n| 1 | 2.5 |"
    md = routing_counts_markdown([[3, 0], [1, 2]], ["x", "y"])
    assert md.splitlines() == ["| expert | x | y | total |", "|---|---|---|---|", "| 0 | 3 | 0 | 3 |", "| 1 | 1 | 2 | 3 |"]
    assert markdown_table(["H(a | b)"], [["x|y"]]).splitlines()[::2] == ["| H(a \\| b) |", "| x\\|y |"]
