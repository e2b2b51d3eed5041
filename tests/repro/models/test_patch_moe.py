"""PatchMoE (Chen et al. 2022 image MoE): patch-sum router, sorted top-1 dispatch vs dense reference,
one expert == the single CNN, gradients, normalised GD, determinism, argument checks.

Legend: B batch, C channels, S image side, s patch side, Q = C·s·s, E experts, L classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from moekit.repro.models.patch_moe import (GATES, PatchMoE, PatchRouter, SmallCNN, default_init_,
                                     normalize_expert_gradients_, patch_sum)
from moekit.types import MoEOutput


def gen(seed):
    return torch.Generator().manual_seed(seed)


def images(B=12, C=1, S=8, seed=0):
    return torch.randn(B, C, S, S, generator=gen(seed))


def randomise_router(router, seed=0, scale=1.0):
    with torch.no_grad():
        router.weight.copy_(scale * torch.randn(router.weight.shape, generator=gen(seed)))
        if router.bias is not None:
            router.bias.copy_(scale * torch.randn(router.bias.shape, generator=gen(seed + 1)))


# ------------------------------------------------------------------------------------- router
@pytest.mark.parametrize("C,S,s", [(1, 8, 4), (1, 8, 2), (3, 8, 4), (2, 6, 3), (1, 8, 8)])
def test_patch_sum_is_the_sum_of_the_patches(C, S, s):
    x = images(5, C, S)
    ref = sum(x[:, :, i:i + s, j:j + s] for i in range(0, S, s) for j in range(0, S, s))  # (B, C, s, s)
    torch.testing.assert_close(patch_sum(x, s), ref.reshape(5, -1))


@pytest.mark.parametrize("bias", [True, False])
def test_router_logits_equal_a_strided_conv_summed_over_positions(bias):
    C, S, s, E = 3, 8, 4, 5
    r = PatchRouter(E, image_size=S, patch_size=s, in_channels=C, bias=bias)
    assert torch.count_nonzero(r.weight) == 0  # zero-initialised
    randomise_router(r, 3)
    x = images(7, C, S, seed=1)
    conv = F.conv2d(x, r.weight.view(E, C, s, s), r.bias, stride=s)    # (B, E, S/s, S/s)
    torch.testing.assert_close(r.logits(x), conv.sum(dim=(2, 3)))


def test_router_sees_only_the_patch_sum():
    """Permuting the patch positions (and any change that keeps Σ_p x^(p)) leaves h(x) unchanged."""
    r = PatchRouter(4, image_size=8, patch_size=2)
    randomise_router(r, 0)
    x = images(6, 1, 8)
    n = 4
    blocks = x.reshape(6, 1, n, 2, n, 2).permute(0, 1, 2, 4, 3, 5).reshape(6, 1, n * n, 2, 2)
    perm = torch.randperm(n * n, generator=gen(1))
    shuffled = blocks[:, :, perm].reshape(6, 1, n, n, 2, 2).permute(0, 1, 2, 4, 3, 5).reshape(6, 1, 8, 8)
    assert not torch.equal(shuffled, x)
    torch.testing.assert_close(r.logits(shuffled), r.logits(x))
    # a change that alters the patch sum does change the logits
    y = x.clone()
    y[:, :, 0, 0] += 1.0
    assert not torch.allclose(r.logits(y), r.logits(x))


def test_router_noise_train_vs_eval_and_gates():
    r = PatchRouter(4, image_size=8, patch_size=4)
    randomise_router(r, 2, scale=0.3)
    x = images(200)
    clean = r.logits(x)
    r.train()
    d = r(x, generator=gen(5))
    noise = d.noisy_logits - clean
    assert noise.min() >= 0 and noise.max() < 1 and noise.std() > 0.2          # fresh U[0,1)
    torch.testing.assert_close(d.probs, torch.softmax(d.noisy_logits, -1))
    assert torch.equal(d.expert_ids[:, 0], d.noisy_logits.argmax(-1))
    torch.testing.assert_close(d.weights[:, 0], d.probs.gather(1, d.expert_ids)[:, 0])  # softmax gate = π_m(x)
    again = r(x, generator=gen(5))
    assert torch.equal(again.noisy_logits, d.noisy_logits)                       # seeded → reproducible
    assert not torch.equal(r(x, generator=gen(6)).noisy_logits, d.noisy_logits)
    r.eval()
    e = r(x, generator=gen(5))
    assert e.noisy_logits is None and torch.equal(e.expert_ids[:, 0], clean.argmax(-1))
    r.noise_in_eval = True
    assert r(x, generator=gen(5)).noisy_logits is not None
    lg = PatchRouter(4, image_size=8, patch_size=4, gate="logit")
    lg.load_state_dict(r.state_dict())
    d2 = lg(x, generator=gen(5))
    torch.testing.assert_close(d2.weights[:, 0], d2.noisy_logits.max(-1).values)  # logit gate = h_m + r_m


def test_zero_init_router_routes_by_noise_uniformly():
    m = PatchMoE(3, 4).train()
    ids = m.assign(images(4000, seed=3), gen(0))
    share = torch.bincount(ids, minlength=4).float() / 4000
    assert (share - 0.25).abs().max() < 0.03


# ------------------------------------------------------------------------------------- MoE
def _grads(module):
    return {n: (p.grad.clone() if p.grad is not None else torch.zeros_like(p)) for n, p in module.named_parameters()}


@pytest.mark.parametrize("gate", GATES)
@pytest.mark.parametrize("idle_expert", [False, True])
def test_sorted_dispatch_equals_dense_reference(gate, idle_expert):
    torch.manual_seed(0)
    model = PatchMoE(5, 4, patch_size=2, width=4, hidden=8, gate=gate, init_generator=gen(1)).train()
    randomise_router(model.router, 4, scale=0.05)
    if idle_expert:  # expert 2 gets nothing
        with torch.no_grad():
            model.router.bias[2] = -100.0
    x, y = images(32, seed=2), torch.randint(0, 5, (32,), generator=gen(3))
    outs = []
    for fwd in (model.forward, model.forward_reference):
        model.zero_grad(set_to_none=True)
        out = fwd(x, generator=gen(9))
        assert isinstance(out, MoEOutput)
        (F.cross_entropy(out.y, y) + out.aux_loss).backward()
        outs.append((out, _grads(model)))
    (fast, g_fast), (ref, g_ref) = outs
    counts = fast.metrics["tokens_per_expert"]
    assert (counts[2] == 0) == idle_expert and counts.sum() == 32 and (counts > 0).sum() >= 3
    torch.testing.assert_close(fast.y, ref.y)
    torch.testing.assert_close(fast.aux_loss, ref.aux_loss)
    assert fast.metrics.keys() == ref.metrics.keys()
    for k in fast.metrics:
        torch.testing.assert_close(fast.metrics[k], ref.metrics[k])
    for n in g_fast:
        torch.testing.assert_close(g_fast[n], g_ref[n], msg=n)


def test_output_is_gate_times_chosen_expert():
    model = PatchMoE(3, 3, width=4, hidden=8, init_generator=gen(0)).train()
    randomise_router(model.router, 1)
    x = images(9, seed=4)
    out = model(x, generator=gen(2))
    d = model.router(x, generator=gen(2))
    for b in range(9):
        m = int(d.expert_ids[b, 0])
        torch.testing.assert_close(out.y[b], d.weights[b, 0] * model.experts[m](x[b:b + 1])[0])
    assert torch.equal(out.metrics["expert_ids"], d.expert_ids[:, 0])


def test_aux_loss_is_weighted_balance_loss():
    model = PatchMoE(3, 4, w_balance=0.5, init_generator=gen(0)).train()
    randomise_router(model.router, 1, scale=0.2)
    x = images(64, seed=5)
    out = model(x, generator=gen(3))
    d = model.router(x, generator=gen(3))
    f = torch.bincount(d.expert_ids[:, 0], minlength=4).float() / 64
    bal = 4 * (f * d.probs.mean(0)).sum()
    torch.testing.assert_close(out.metrics["balance_loss"], bal)
    torch.testing.assert_close(out.aux_loss, 0.5 * bal)
    assert out.aux_loss.requires_grad and not out.metrics["balance_loss"].requires_grad
    assert PatchMoE(3, 4, w_balance=0.0)(x).aux_loss.item() == 0.0


def test_one_expert_is_the_single_cnn():
    single = SmallCNN(7, width=6, hidden=10, generator=gen(11))
    moe = PatchMoE(7, 1, width=6, hidden=10, init_generator=gen(11))
    # the same generator draws the same init
    for (n1, p1), (n2, p2) in zip(single.state_dict().items(), moe.experts[0].state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x = images(10, seed=6)
    for mode in ("train", "eval"):
        getattr(moe, mode)()
        out = moe(x, generator=gen(0))
        torch.testing.assert_close(out.y, single(x))        # softmax over one expert: gate = 1
        torch.testing.assert_close(out.metrics["gate_mean"], torch.tensor(1.0))


def test_gradients_reach_router_and_experts():
    model = PatchMoE(4, 4, width=4, hidden=8, init_generator=gen(0)).train()
    x, y = images(64, seed=7), torch.randint(0, 4, (64,), generator=gen(1))
    out = model(x, generator=gen(2))
    (F.cross_entropy(out.y, y) + out.aux_loss).backward()
    assert model.router.weight.grad is not None and model.router.weight.grad.abs().sum() > 0
    counts = out.metrics["tokens_per_expert"]
    assert (counts > 0).all()
    for e in model.experts:
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in e.parameters())
    # and the gradient to the router comes through the task loss, not only the balance loss
    model.zero_grad()
    F.cross_entropy(model(x, generator=gen(2)).y, y).backward()
    assert model.router.weight.grad.abs().sum() > 0


def test_eval_is_deterministic_and_noise_in_eval_is_seeded():
    model = PatchMoE(3, 4, init_generator=gen(0))
    randomise_router(model.router, 1, scale=0.05)
    x = images(300, seed=8)
    model.eval()
    a, b = model(x), model(x, generator=gen(1))
    assert torch.equal(a.y, b.y) and torch.equal(a.metrics["expert_ids"], b.metrics["expert_ids"])
    noisy = PatchMoE(3, 4, init_generator=gen(0), noise_in_eval=True)
    noisy.load_state_dict(model.state_dict())
    noisy.eval()
    c, d = noisy(x, generator=gen(1)), noisy(x, generator=gen(1))
    assert torch.equal(c.y, d.y)
    assert not torch.equal(noisy(x, generator=gen(2)).metrics["expert_ids"], c.metrics["expert_ids"])


def test_normalize_expert_gradients():
    experts = [SmallCNN(3, width=2, hidden=4, generator=gen(i)) for i in range(3)]
    x = images(8, seed=9)
    for i in (0, 2):  # expert 1 gets no gradient
        (experts[i](x).pow(2).sum() * (i + 1)).backward()
    before = [sum(p.grad.norm() for p in experts[i].parameters()) for i in (0, 2)]
    grads0 = [p.grad.clone() for p in experts[0].parameters()]
    norms = normalize_expert_gradients_(experts)
    torch.testing.assert_close(norms, torch.stack([before[0], torch.tensor(0.0), before[1]]))
    for i in (0, 2):
        total = sum(p.grad.norm() for p in experts[i].parameters())
        torch.testing.assert_close(total, torch.tensor(1.0))
    for p, g in zip(experts[0].parameters(), grads0):  # direction unchanged
        torch.testing.assert_close(p.grad * norms[0], g)
    assert all(p.grad is None for p in experts[1].parameters())


def test_default_init_bounds_and_reproducibility():
    a, b, c = (SmallCNN(10, generator=gen(s)) for s in (0, 0, 1))
    for (n, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb) and not torch.equal(pa, pc), n
    fan_in = {"conv1": 9, "conv2": 16 * 9, "fc1": 32 * 16, "fc2": 64}
    for layer, fi in fan_in.items():
        for p in getattr(a, layer).parameters():
            bound = 1 / math.sqrt(fi)
            assert p.abs().max() <= bound and p.abs().max() > 0.8 * bound
    assert default_init_(torch.nn.Linear(3, 2), gen(0)).weight.abs().max() <= 1 / math.sqrt(3)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="num_experts"):
        PatchMoE(3, 0)
    with pytest.raises(ValueError, match="num_classes"):
        PatchMoE(0, 2)
    with pytest.raises(ValueError, match="patch_size"):
        PatchMoE(3, 2, patch_size=3)
    with pytest.raises(ValueError, match="gate"):
        PatchMoE(3, 2, gate="sigmoid")
    with pytest.raises(ValueError, match="w_balance"):
        PatchMoE(3, 2, w_balance=-0.1)
    with pytest.raises(ValueError, match="image_size"):
        SmallCNN(3, image_size=7)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(3, width=0)
    with pytest.raises(TypeError, match="noise_in_eval"):
        PatchRouter(2, noise_in_eval="yes")
    with pytest.raises(ValueError, match="patch_size"):
        patch_sum(images(2), 3)
    m = PatchMoE(3, 2)
    with pytest.raises(ValueError, match="x"):
        m(torch.zeros(2, 1, 6, 6))
    with pytest.raises(ValueError, match="x"):
        m(torch.zeros(2, 8, 8))
    with pytest.raises(TypeError, match="x"):
        m(torch.zeros(2, 1, 8, 8, dtype=torch.long))
    with pytest.raises(TypeError, match="x"):
        m([[0.0]])
    with pytest.raises(ValueError, match="at least one image"):
        m(torch.zeros(0, 1, 8, 8))
