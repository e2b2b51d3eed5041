"""Routing statistics: losses formed from summed statistics equal the losses of one big batch."""
import math
import os

import pytest
import torch

from moekit import MoE, losses as L
from moekit.routing import build_router
from moekit.stats import RoutingStats


def test_accumulated_statistics_equal_the_concatenated_batch_by_hand():
    # E = 2, top-1, router logits set through the input: token t has logits [a_t, 0].
    # Four micro-batches of one token each with a = ln 3, ln 3, 0, -ln 3:
    #   probs = [.75,.25], [.75,.25], [.5,.5], [.25,.75]; top-1 experts 0, 0, 0 (tie -> 0), 1
    #   f = [3/4, 1/4]; P = [(.75+.75+.5+.25)/4, (.25+.25+.5+.75)/4] = [0.5625, 0.4375]
    #   switch = E Σ f P = 2 (0.75·0.5625 + 0.25·0.4375) = 2 (0.421875 + 0.109375) = 1.0625
    #   importance (probs) = [2.25, 1.75]: mean 2, var 0.0625, CV² = 0.0625/4 = 0.015625
    r = build_router("topk", 1, 2, 1, w_switch=1.0, w_importance=1.0, renormalize=False)
    with torch.no_grad():
        r.gate.weight.copy_(torch.tensor([[1.0], [0.0]]))
    r.eval()
    a = torch.tensor([[math.log(3)], [math.log(3)], [0.0], [-math.log(3)]])
    whole = r(a)
    parts = [r(a[i:i + 1]) for i in range(4)]
    total = parts[0].stats + parts[1].stats + parts[2].stats + parts[3].stats
    aux, m = r.balance_losses(total)
    for metrics in (whole.metrics, m):
        assert metrics["switch_loss"].item() == pytest.approx(1.0625, rel=1e-6)
        assert metrics["importance_loss"].item() == pytest.approx(0.015625, rel=1e-5)
    torch.testing.assert_close(aux, whole.aux_loss)
    # per micro-batch losses are something else (each one-token batch is maximally unbalanced)
    assert parts[0].metrics["switch_loss"].item() == pytest.approx(2 * 0.75, rel=1e-6)


@pytest.mark.parametrize("router", ["noisy_topk", "topk", "vmoe", "switch", "sigmoid", "expert_choice", "soft",
                                    "softmax"])
def test_layer_statistics_add_over_micro_batches(router):
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=router, w_z=1e-3).eval()
    if router == "noisy_topk":
        with torch.no_grad():
            layer.router.gate.weight.normal_()
    x = torch.randn(32, 8)
    whole = layer(x)
    chunks = [layer(c) for c in x.chunk(4)]
    total = chunks[0].stats
    for c in chunks[1:]:
        total = total + c.stats
    aux, parts = layer.router.balance_losses(total)
    if router in ("expert_choice", "soft"):
        return    # their selections depend on the whole batch: statistics add, decisions differ
    torch.testing.assert_close(aux, whole.aux_loss)
    for k, v in parts.items():
        torch.testing.assert_close(v, whole.metrics[k], msg=k)


def test_accumulated_loss_gradient_equals_the_big_batch():
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router="noisy_topk").train()
    with torch.no_grad():
        layer.router.gate.weight.normal_()
        layer.router.noise.weight.normal_()
    x = torch.randn(32, 8)
    g = torch.Generator().manual_seed(0)
    noise = [torch.Generator().manual_seed(i) for i in range(4)]
    total = None
    for c, gen in zip(x.chunk(4), noise):
        s = layer(c, generator=gen).stats
        total = s if total is None else total + s
    aux, _ = layer.router.balance_losses(total)
    aux.backward()
    g_acc = layer.router.gate.weight.grad.clone()
    layer.zero_grad()
    # the big batch with the same noise: draw it per chunk the same way
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    stats = [layer.router(c, generator=gen).stats for c, gen in zip(x.chunk(4), gens)]
    whole = RoutingStats.cat(stats)                  # 4 groups ...
    assert whole.num_groups == 4
    merged = stats[0] + stats[1] + stats[2] + stats[3]   # ... or one
    layer.router.balance_losses(merged)[0].backward()
    torch.testing.assert_close(layer.router.gate.weight.grad, g_acc)
    del g


def test_all_reduce_over_a_one_process_group_equals_single_process(tmp_path):
    import torch.distributed as dist
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    init = f"file://{tmp_path / 'pg'}"
    dist.init_process_group("gloo", init_method=init, rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        local = MoE(8, 16, 4, router="topk", w_z=1e-3).eval()
        glob = MoE(8, 16, 4, router="topk", w_z=1e-3, balance_group=dist.group.WORLD).eval()
        glob.load_state_dict(local.state_dict())
        x1 = torch.randn(20, 8, requires_grad=True)
        x2 = x1.detach().clone().requires_grad_()
        o1, o2 = local(x1), glob(x2)
        torch.testing.assert_close(o2.aux_loss, o1.aux_loss)
        (o1.y.sum() + o1.aux_loss).backward()
        (o2.y.sum() + o2.aux_loss).backward()
        torch.testing.assert_close(x2.grad, x1.grad)
        for p1, p2 in zip(local.parameters(), glob.parameters()):
            torch.testing.assert_close(p2.grad, p1.grad)
    finally:
        dist.destroy_process_group()


def test_statistics_errors():
    r = build_router("topk", 4, 3)
    a = r(torch.randn(5, 4)).stats
    b = build_router("topk", 4, 3, 1)(torch.randn(5, 4)).stats
    with pytest.raises(ValueError, match="top_k"):
        a + b
    with pytest.raises(TypeError, match="other"):
        a + 1
    with pytest.raises(ValueError, match="stats"):
        RoutingStats.cat([])


def test_losses_are_zero_for_no_tokens():
    s = build_router("noisy_topk", 4, 3).train()(torch.randn(0, 4)).stats
    for fn in (L.switch_loss_from_stats, L.gshard_loss_from_stats, L.importance_loss_from_stats,
               L.load_loss_from_stats, L.z_loss_from_stats):
        v = fn(s)
        assert v.item() == 0.0
