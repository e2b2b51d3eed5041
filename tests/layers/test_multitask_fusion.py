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


def test_quadratic_affinity_penalty_by_hand():
    w = torch.tensor([0.5, 0.3, 0.2])
    A = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.1], [0.0, 0.1, 1.0]])
    # w'Aw = (0.25 + 0.09 + 0.04) + 0.252 (the pairwise part above) = 0.632
    assert affinity_penalty(w, A, "quadratic").item() == pytest.approx(0.632)
    # with A = I it is Σ w_i², smallest at uniform weights (1/N), largest on one representation (1)
    eye = torch.eye(4)
    assert affinity_penalty(torch.full((4,), 0.25), eye, "quadratic").item() == pytest.approx(0.25)
    assert affinity_penalty(torch.tensor([1.0, 0, 0, 0]), eye, "quadratic").item() == pytest.approx(1.0)
    # two redundant representations (A_01 = 1) count as one: splitting weight between them does not help
    A2 = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    split = affinity_penalty(torch.tensor([0.25, 0.25, 0.5]), A2, "quadratic")
    one = affinity_penalty(torch.tensor([0.5, 0.0, 0.5]), A2, "quadratic")
    assert split.item() == pytest.approx(one.item()) == pytest.approx(0.5)


def test_fusion_weights_are_the_ones_forward_mixes_with():
    torch.manual_seed(1)
    m = SituationalFusion([3, 4], num_actions=5, level="action", affinity=torch.eye(2), beta=0.5,
                          penalty_form="quadratic")
    feats = [torch.randn(6, 3), torch.randn(6, 4)]
    w = m.fusion_weights(feats)
    assert w.shape == (6, 2)
    torch.testing.assert_close(w.sum(-1), torch.ones(6))
    out = m(feats)
    probs = torch.stack([torch.softmax(h(f), -1) for h, f in zip(m.heads, feats)], 1)
    torch.testing.assert_close(out.y, (w[..., None] * probs).sum(1))
    torch.testing.assert_close(out.metrics["fusion_weights"], w.mean(0).detach())
    torch.testing.assert_close(out.aux_loss, 0.5 * (w.mean(0) ** 2).sum())
    with pytest.raises(ValueError, match="penalty_form"):
        SituationalFusion([3], 2, affinity=torch.eye(1), penalty_form="max")
    with pytest.raises(ValueError, match="features"):
        m.fusion_weights(feats[:1])
