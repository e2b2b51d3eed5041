"""DeepMoE ResNet: MACs by hand, eval skip == train dense, freeze_gates, losses, L1 sparsifies, bad args.

Legend: B batch, C channels, K classes, L gated layers.
"""
import pytest
import torch
import torch.nn.functional as F

from moekit.layers.deepmoe import DeepMoEOutput, deepmoe_aux_loss
from moekit.repro.models.deepmoe_resnet import DeepMoEResNet, deepmoe_resnet

# plain ×1 network (c = 8), MACs per 8×8 image written out layer by layer
STEM = 64 * 8 * 1 * 9
BLOCK1 = 2 * (64 * 8 * 8 * 9)
BLOCK2 = 16 * 16 * 8 * 9 + 16 * 16 * 16 * 9 + 16 * 16 * 8            # conv1 (stride 2), conv2, 1×1 shortcut
BLOCK3 = 4 * 32 * 16 * 9 + 4 * 32 * 32 * 9 + 4 * 32 * 16
HEAD = 32 * 10
PLAIN_X1 = STEM + BLOCK1 + BLOCK2 + BLOCK3 + HEAD
EMBEDDING = 16 * 8 * 9 + 4 * 16 * 8 * 9 + 32 * 16 * 9 + 32 * 10       # shallow embedding + its classifier
GATE_HEADS = 32 * (8 + 8 + 8 + 16 + 16 + 32)


def _sparse_model(seed: int = 0, **kw) -> DeepMoEResNet:
    """A gated ×1 network whose gate heads give some always-zero and some sometimes-zero channels."""
    torch.manual_seed(seed)
    model = DeepMoEResNet(**kw)
    with torch.no_grad():
        for head in model.gate.heads:
            head.weight.normal_(0, 2.0)
            head.bias.uniform_(-0.5, 1.0)
            head.bias[0] = -100.0                    # channel 0 of every gated conv: zero for all inputs
    return model


def test_mac_totals_by_hand():
    x = torch.randn(3, 1, 8, 8)
    plain = deepmoe_resnet("plain").eval()
    out = plain(x)
    assert isinstance(out, DeepMoEOutput) and out.y.shape == (3, 10)
    assert out.embedding_logits is None and out.gates == [] and float(out.aux_loss) == 0.0
    assert PLAIN_X1 == 193344
    for k in ("macs_executed", "macs_ideal", "macs_dense"):
        assert float(out.metrics[k]) == PLAIN_X1
    gated = deepmoe_resnet("narrow").eval()
    with torch.no_grad():
        m = gated(x).metrics
    assert float(m["macs_dense"]) == PLAIN_X1 + EMBEDDING + GATE_HEADS
    assert gated.overhead_macs(8, 8) == EMBEDDING + GATE_HEADS
    wide = deepmoe_resnet("wide")
    assert wide.widths == [16, 32, 64] and gated.widths == [8, 16, 32]
    assert wide.gate_channels == [16, 16, 16, 32, 32, 64]


def test_mac_totals_by_hand_at_14x14_with_c4():
    """The run's default base (MNIST pooled to 14×14, c = 4): the stride-2 convs round 7×7 up to 4×4."""
    stem = 196 * 4 * 1 * 9
    block1 = 2 * (196 * 4 * 4 * 9)
    block2 = 49 * 8 * 4 * 9 + 49 * 8 * 8 * 9 + 49 * 8 * 4             # 14×14 → 7×7: conv1, conv2, 1×1 shortcut
    block3 = 16 * 16 * 8 * 9 + 16 * 16 * 16 * 9 + 16 * 16 * 8          # 7×7 → 4×4
    head = 16 * 10
    plain = deepmoe_resnet("plain", base_channels=4).eval()
    out = plain(torch.randn(2, 1, 14, 14))
    assert float(out.metrics["macs_dense"]) == stem + block1 + block2 + block3 + head == 164912
    assert out.y.shape == (2, 10)


def test_eval_skip_equals_train_dense_at_14x14_wide():
    model = _sparse_model(width_multiplier=2.0, base_channels=4).double()
    x = torch.randn(4, 1, 14, 14, dtype=torch.float64)
    dense = model.train()(x)
    skip = model.eval()(x)
    torch.testing.assert_close(skip.y, dense.y)
    assert float(skip.metrics["macs_executed"]) < float(skip.metrics["macs_dense"])


def test_eval_skip_equals_train_dense_and_batch1_executed_equals_ideal():
    model = _sparse_model().double()
    x = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    model.train()
    dense = model(x)
    model.eval()
    skip = model(x)
    torch.testing.assert_close(skip.y, dense.y)
    torch.testing.assert_close(skip.embedding_logits, dense.embedding_logits)
    assert float(dense.metrics["flops_ratio"]) == 1.0
    assert float(skip.metrics["macs_executed"]) < float(skip.metrics["macs_dense"])
    zero = float(skip.metrics["zero_gates"])
    assert 1 / 8 <= zero < 1
    n_gates = sum(g.numel() for g in skip.gates)
    assert zero == pytest.approx(sum(float((g == 0).sum()) for g in skip.gates) / n_gates)
    # the always-zero channel 0 is skipped in every gated conv
    for layer in range(6):
        assert float(skip.metrics[f"conv{layer}/active_channels"]) <= model.gate_channels[layer] - 1
    # one image at a time: executed == the per-example ideal; their mean == the batch's ideal
    per_image = [model(x[b:b + 1]).metrics for b in range(6)]
    for m in per_image:
        assert float(m["macs_executed"]) == pytest.approx(float(m["macs_ideal"]))
    mean_exec = sum(float(m["macs_executed"]) for m in per_image) / 6
    assert mean_exec == pytest.approx(float(skip.metrics["macs_ideal"]))
    assert mean_exec <= float(skip.metrics["macs_executed"])


def test_aux_loss_and_embedding_loss_match_the_reference():
    model = _sparse_model(l1_weight=0.02, embedding_weight=0.7)
    x, y = torch.randn(5, 1, 8, 8), torch.tensor([0, 1, 2, 3, 4])
    out = model(x)
    ref = deepmoe_aux_loss(out.gates, out.embedding_logits, y, 0.02, 0.7)
    emb = model.embedding_loss(out, y)
    torch.testing.assert_close(out.aux_loss + emb.aux_loss, ref.aux_loss)
    total_l1 = sum(float(g.detach().abs().sum(1).mean()) for g in out.gates)
    assert float(out.metrics["gate_l1"]) == pytest.approx(total_l1, rel=1e-5)
    assert float(out.aux_loss.detach()) == pytest.approx(0.02 * total_l1, rel=1e-5)
    assert float(emb.aux_loss.detach()) == pytest.approx(0.7 * float(F.cross_entropy(out.embedding_logits, y).detach()),
                                                         rel=1e-5)
    assert all(not v.requires_grad for v in out.metrics.values())


def test_freeze_gates_stops_gradients_and_zeroes_weights():
    model = _sparse_model(l1_weight=0.01, embedding_weight=0.5)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    out = model(x)
    (F.cross_entropy(out.y, y) + out.aux_loss + model.embedding_loss(out, y).aux_loss).backward()
    assert all(p.grad is not None for p in model.gate.parameters())
    assert all(p.grad is not None for p in model.embedding.parameters())
    model.zero_grad(set_to_none=True)

    model.freeze_gates()
    assert model.gates_frozen and model.l1_weight == 0.0 and model.embedding_weight == 0.0
    assert all(conv.l1_weight == 0.0 for conv in model.gated_convs())
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    out = model(x)
    assert float(out.aux_loss) == 0.0 and float(model.embedding_loss(out, y).aux_loss) == 0.0
    (F.cross_entropy(out.y, y) + out.aux_loss + model.embedding_loss(out, y).aux_loss).backward()
    assert all(p.grad is None for p in model.gate.parameters())
    assert all(p.grad is None for p in model.embedding.parameters())
    assert model.stem.weight.grad is not None and model.blocks[0].conv1.weight.grad is not None
    opt.step()
    after = model.state_dict()
    for k in before:   # gating untouched, every base-network tensor updated
        assert torch.equal(before[k], after[k]) == k.startswith(("gate.", "embedding.")), k


def test_l1_weight_makes_gates_sparser():
    torch.manual_seed(0)
    x, y = torch.randn(96, 1, 8, 8), torch.randint(0, 10, (96,))
    zeros = {}
    for lam in (0.0, 0.01):
        torch.manual_seed(1)
        model = deepmoe_resnet("narrow", l1_weight=lam)
        opt = torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(25):
            out = model(x)
            loss = F.cross_entropy(out.y, y) + out.aux_loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            zeros[lam] = float(model.eval()(x).metrics["zero_gates"])
    assert zeros[0.01] > zeros[0.0] + 0.1


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="width_multiplier"):
        DeepMoEResNet(width_multiplier=0)
    with pytest.raises(ValueError, match="blocks_per_stage"):
        DeepMoEResNet(blocks_per_stage=())
    with pytest.raises(ValueError, match="base_channels"):
        DeepMoEResNet(base_channels=0)
    with pytest.raises(TypeError, match="gated"):
        DeepMoEResNet(gated="yes")
    with pytest.raises(ValueError, match="l1_weight"):
        DeepMoEResNet(l1_weight=-0.1)
    with pytest.raises(ValueError, match="l1_weight"):
        DeepMoEResNet(gated=False, l1_weight=0.1)
    with pytest.raises(ValueError, match="freeze_gates"):
        DeepMoEResNet(gated=False).freeze_gates()
    with pytest.raises(ValueError, match="variant"):
        deepmoe_resnet("huge")
    with pytest.raises(ValueError, match="x"):
        DeepMoEResNet()(torch.randn(2, 3, 8, 8))
    with pytest.raises(TypeError, match="x"):
        DeepMoEResNet()([[0.0]])


def test_conv1_skips_the_output_channels_whose_second_gate_is_zero():
    model = _sparse_model().double().eval()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    out = model(x)
    model.train()
    dense = model(x)
    model.eval()
    torch.testing.assert_close(out.y, dense.y)                    # the skipped outputs are read with gate 0
    block = model.blocks[0]
    g1, g2 = out.gates[0], out.gates[1]
    h = F.relu(model.stem(x))
    o1 = block(h, g1, g2)[1][0]
    per_pair = 9 * 8 * 8
    live_in = int((g1 != 0).any(0).sum())
    live_out = int((g2 != 0).any(0).sum())
    assert live_out < block.conv1.out_channels                     # channel 0 of the second gate is always 0
    assert float(o1.metrics["macs_executed"]) == live_in * live_out * per_pair
    ideal = ((g1 != 0).sum(1).double() * (g2 != 0).sum(1).double()).mean() * per_pair
    assert float(o1.metrics["macs_ideal"]) == pytest.approx(float(ideal))
    # the library conv alone would have computed every output channel of the live inputs
    assert float(block.conv1(h, g1).metrics["macs_executed"]) == live_in * block.conv1.out_channels * per_pair
