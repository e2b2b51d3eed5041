import pytest
import torch

from moekit.layers.fusion import SituationalFusion, affinity_penalty
from moekit.layers.multitask import MultiGateMoE


def test_mmoe_matches_explicit_sum():
    torch.manual_seed(0)
    m = MultiGateMoE(6, 10, 3, num_tasks=2)
    x = torch.randn(4, 6)
    out = m(x)
    assert out.y.shape == (2, 4, 6)
    for t in range(2):
        g = torch.softmax(x @ m.gates[t], -1)
        ref = sum(g[:, e:e + 1] * m.experts.forward_dense(x)[e] for e in range(3))
        torch.testing.assert_close(out.y[t], ref, rtol=1e-5, atol=1e-6)
    assert out.aux_loss.item() == 0
    out.y.sum().backward()
    assert all(p.grad is not None for p in m.parameters())
    with pytest.raises(ValueError, match="num_tasks"):
        MultiGateMoE(6, 10, 3, num_tasks=0)


def test_affinity_penalty_by_hand():
    w = torch.tensor([0.5, 0.3, 0.2])
    A = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.1], [0.0, 0.1, 1.0]])
    # pairwise: 2·(0.5·0.3·0.8 + 0.5·0.2·0 + 0.3·0.2·0.1) = 2·(0.12 + 0.006) = 0.252
    assert affinity_penalty(w, A, "pairwise").item() == pytest.approx(0.252)
    # mean: 0.5·(0.8+0)/2 + 0.3·(0.8+0.1)/2 + 0.2·(0+0.1)/2 = 0.2 + 0.135 + 0.01 = 0.345
    assert affinity_penalty(w, A, "mean").item() == pytest.approx(0.345)
    with pytest.raises(ValueError, match="form"):
        affinity_penalty(w, A, "max")


@pytest.mark.parametrize("level", ["action", "feature"])
def test_situational_fusion_outputs_a_policy(level):
    torch.manual_seed(0)
    A = torch.rand(3, 3)
    m = SituationalFusion([5, 7, 4], num_actions=6, level=level, affinity=A, beta=0.1)
    feats = [torch.randn(8, 5), torch.randn(8, 7), torch.randn(8, 4)]
    out = m(feats)
    assert out.y.shape == (8, 6)
    torch.testing.assert_close(out.y.sum(-1), torch.ones(8))
    torch.testing.assert_close(out.metrics["fusion_weights"].sum(), torch.tensor(1.0))
    torch.testing.assert_close(out.aux_loss.detach(), 0.1 * out.metrics["affinity_penalty"])
    (out.y.log().mean() + out.aux_loss).backward()
    with pytest.raises(ValueError, match="features"):
        m(feats[:2])
    with pytest.raises(ValueError, match="level"):
        SituationalFusion([5], 2, level="policy")
