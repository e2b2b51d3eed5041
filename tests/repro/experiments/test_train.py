"""The shared training loop, schedules, per-run optimisers, early stopping and seeding helper.

Legend: R runs, E epochs, N examples.
"""
import math

import pytest
import torch

from moekit.repro.experiments.train import (EarlyStop, OneCycle, RunAdam, RunNormalizedGD, RunSGD, cosine, fit,
                                      seed_generator, seed_value, seeded_global, warmup_cosine)


def test_seed_helper():
    assert seed_value(3, 0) == 3 and seed_value(3, 2) == 20_003
    a = torch.rand(3, generator=seed_generator(1, 5))
    b = torch.rand(3, generator=seed_generator(1, 5))
    assert torch.equal(a, b) and not torch.equal(a, torch.rand(3, generator=seed_generator(2, 5)))
    before = torch.random.get_rng_state()
    with seeded_global(4, 1):
        x = torch.rand(2)
    assert torch.equal(torch.random.get_rng_state(), before)       # caller's state restored
    with seeded_global(4, 1):
        assert torch.equal(torch.rand(2), x)
    with pytest.raises(ValueError, match="seed"):
        seed_value(10_000)


def test_schedules_by_hand():
    assert cosine(0, 10) == 1.0 and cosine(5, 10) == pytest.approx(0.5) and cosine(10, 10) == pytest.approx(0.0)
    f = warmup_cosine(0.2)         # 2 warm-up steps of 10
    assert f(0, 10) == pytest.approx(0.5 * cosine(0, 10)) and f(1, 10) == pytest.approx(cosine(1, 10))


def test_full_batch_sgd_on_a_quadratic():
    # loss = ½ (w − 3)², gradient w − 3: SGD with lr 0.5 halves the distance every step
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.5)
    log = fit(lambda idx: 0.5 * (w - 3) ** 2, [opt], epochs=3)
    assert w.item() == pytest.approx(3 - 3 / 8)
    assert log.losses.tolist() == pytest.approx([4.5, 4.5 / 4, 4.5 / 16])
    assert log.steps.tolist() == [3] and log.stopped_at.tolist() == [-1]


def test_cosine_schedule_sets_the_learning_rate_per_step():
    w = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([w], lr=1.0)
    seen = []
    fit(lambda idx: (seen.append(opt.param_groups[0]["lr"]), w * 1.0)[1], [opt], epochs=2, n=4, batch_size=2,
        generator=torch.Generator().manual_seed(0), schedule=cosine)
    assert seen == pytest.approx([cosine(t, 4) for t in range(4)])
    assert w.item() == pytest.approx(-sum(cosine(t, 4) for t in range(4)))


def test_one_cycle_matches_torch():
    w = torch.zeros(2, requires_grad=True)
    opt = torch.optim.AdamW([w], lr=0.1)
    seen = []
    fit(lambda idx: (seen.append(opt.param_groups[0]["lr"]), w.sum())[1], [opt], epochs=10, schedule=OneCycle(0.3))
    ref_opt = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(ref_opt, max_lr=0.1, total_steps=10, pct_start=0.3)
    ref = []
    for _ in range(10):
        ref.append(ref_opt.param_groups[0]["lr"])
        ref_opt.step()
        sched.step()
    assert seen == pytest.approx(ref)


def test_minibatches_cover_every_example_once_per_epoch():
    seen = []
    w = torch.zeros((), requires_grad=True)
    fit(lambda idx: (seen.append(idx.clone()), w * 0)[1], [torch.optim.SGD([w], lr=0.1)], epochs=2, n=7,
        batch_size=3, generator=torch.Generator().manual_seed(0))
    assert [len(i) for i in seen] == [3, 3, 1, 3, 3, 1]
    assert sorted(torch.cat(seen[:3]).tolist()) == list(range(7)) == sorted(torch.cat(seen[3:]).tolist())
    seen.clear()
    fit(lambda idx: (seen.append(idx.clone()), w * 0)[1], [torch.optim.SGD([w], lr=0.1)], epochs=3, n=7,
        batch_size=5, sample="replacement", generator=torch.Generator().manual_seed(0))
    assert [len(i) for i in seen] == [5, 5, 5]


def test_early_stop_per_run_freezes_stopped_runs_and_logs_nan():
    # two runs; run 0's loss rises after step 1 (stops at step 2), run 1's keeps falling
    values = torch.tensor([[1.0, 0.5, 0.9, 0.1], [1.0, 0.8, 0.6, 0.4]])
    w = torch.zeros(2, requires_grad=True)
    step = {"t": 0}

    def loss_fn(idx):
        t = step["t"]
        step["t"] += 1
        return values[:, t] + 0 * w
    opt = RunSGD([w], lr=1.0)
    log = fit(loss_fn, [opt], epochs=4, early_stop=EarlyStop(2, tol=0.02))
    assert log.stopped_at.tolist() == [2, -1] and log.steps.tolist() == [2, 4]
    assert log.losses[0, :3].tolist() == pytest.approx([1.0, 0.5, 0.9]) and math.isnan(log.losses[0, 3])
    assert log.losses[1].tolist() == pytest.approx([1.0, 0.8, 0.6, 0.4])


def test_early_stop_floor_and_after():
    s = EarlyStop(1, tol=0.02, floor=0.3, after=0)
    assert s.update(0, torch.tensor([0.5])).item() and s.update(1, torch.tensor([0.29])).item()  # new best
    assert not s.update(2, torch.tensor([0.295])).item()           # not a new best, at the floor: stop
    s = EarlyStop(1, tol=0.02, after=5)
    s.update(0, torch.tensor([0.5]))
    assert s.update(3, torch.tensor([0.9])).item()                 # rose, but before step 5
    assert not s.update(6, torch.tensor([0.9])).item()


def test_normalized_gd_by_hand():
    # R = 2 runs, M = 2 experts; weight (R, M, 1, 2), bias (R, M, 1)
    w = torch.zeros(2, 2, 1, 2, requires_grad=True)
    b = torch.zeros(2, 2, 1, requires_grad=True)
    w.grad = torch.tensor([[[[3.0, 4.0]], [[0.0, 0.0]]], [[[1.0, 0.0]], [[0.0, 2.0]]]])
    b.grad = torch.tensor([[[12.0], [0.0]], [[0.0], [2.0]]])
    RunNormalizedGD([w, b], lr=0.1).step(torch.tensor([True, False]))
    # run 0 expert 0: ‖g_w‖ + ‖g_b‖ = 5 + 12 = 17 → w = −0.1·(3, 4)/17, b = −0.1·12/17
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([-0.3 / 17, -0.4 / 17]))
    torch.testing.assert_close(b[0, 0], torch.tensor([-1.2 / 17]))
    # run 0 expert 1 has zero gradient: unchanged (no division by 0); run 1 is inactive: unchanged
    assert w[0, 1].abs().sum() == 0 and b[0, 1].abs().sum() == 0 and w[1].abs().sum() == 0 and b[1].abs().sum() == 0
    RunNormalizedGD([w, b], lr=0.1).step()
    # run 1 expert 1: ‖(0, 2)‖ + ‖2‖ = 4 → w = −0.1·(0, 2)/4, b = −0.1·2/4
    torch.testing.assert_close(w[1, 1, 0], torch.tensor([0.0, -0.05]))
    torch.testing.assert_close(b[1, 1], torch.tensor([-0.05]))
    p = torch.ones(2, 3, requires_grad=True)
    p.grad = torch.ones(2, 3)
    RunSGD([p], 0.5).step(torch.tensor([False, True]))
    assert p[0].tolist() == [1, 1, 1] and p[1].tolist() == [0.5, 0.5, 0.5]



def test_run_adam_matches_torch_adam_per_run():
    torch.manual_seed(0)
    w = torch.randn(2, 3, requires_grad=True)
    ref = [w[r].detach().clone().requires_grad_() for r in range(2)]
    opt = RunAdam([w], lr=0.1, weight_decay=0.01)
    ref_opts = [torch.optim.Adam([p], lr=0.1, weight_decay=0.01) for p in ref]
    for step in range(3):
        g = torch.randn(2, 3)
        w.grad = g.clone()
        active = torch.tensor([True, step < 2])      # run 1 stops after two steps
        opt.step(active)
        for r in range(2):
            if active[r]:
                ref[r].grad = g[r].clone()
                ref_opts[r].step()
    for r in range(2):
        assert torch.allclose(w.detach()[r], ref[r].detach(), atol=1e-6)


def test_early_stop_rule_by_hand():
    s = EarlyStop(2, tol=0.02, floor=0.314)
    # run 0: 0.5 → 0.45 (better) → 0.47 (worse by 0.02: not > 0.02, keep) → 0.48 (0.03 above best: stop)
    # run 1: 0.5 → 0.3135 (new best: keep) → 0.3136 (not better and ≤ floor: stop)
    seq = [(0.5, 0.5), (0.45, 0.3135), (0.47, 0.3136), (0.48, 0.2)]
    actives = [s.update(t, torch.tensor(v)).tolist() for t, v in enumerate(seq)]
    assert actives == [[True, True], [True, True], [True, False], [False, False]]
    late = EarlyStop(1, tol=0.02, after=2)
    assert [late.update(t, torch.tensor([v])).item() for t, v in enumerate([1.0, 2.0, 2.0, 2.0])] == \
        [True, True, True, False]


def test_fit_checks_its_arguments():
    w = torch.zeros((), requires_grad=True)
    with pytest.raises(ValueError, match="epochs"):
        fit(lambda idx: w, [torch.optim.SGD([w], lr=0.1)], epochs=0)
    with pytest.raises(ValueError, match="sample"):
        fit(lambda idx: w, [torch.optim.SGD([w], lr=0.1)], epochs=1, sample="bootstrap")
