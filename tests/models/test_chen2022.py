"""Chen et al. 2022 models: data generator, batched-over-runs experts/MoE/optimisers vs plain references.

Legend: R runs, N examples, P patches, D patch dim, K clusters, M experts, F filters (2J), C classes.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from moekit.models.chen2022 import (ChenMoE, ChenSingle, EarlyStop, RunAdam, accuracy_R, cubic_patch_logits,
                                    make_chen_data, moe_loss_R, normalized_gd_step_, orthonormal_vectors,
                                    patch_expert_logits, sgd_step_, single_loss_R, train_moe, train_single)
from moekit.types import MoEOutput


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------- data
def test_data_patches_follow_the_recipe():
    # σ_p = 0 makes the noise patches exactly zero, so every other patch can be read off exactly
    K, P, D, n, scale = 3, 5, 12, 400, 10.0
    d = make_chen_data(n, num_clusters=K, num_patches=P, dim=D, sigma_p=0.0, gamma_max=3.0, scale=scale,
                       generator=gen(0))
    assert d.x_NPD.shape == (n, P, D) and d.x.shape == (n, P * D) and len(d) == n
    basis = torch.cat([d.features_KD, d.centres_KD])                      # (2K, D): v_1..v_K, c_1..c_K
    torch.testing.assert_close(basis @ basis.t(), torch.eye(2 * K), atol=1e-5, rtol=0)
    assert set(d.y_N.unique().tolist()) == {0, 1} and (d.noise_cluster_N != d.cluster_N).all()
    coef_NPB = torch.einsum("npd,bd->npb", d.x_NPD / scale, basis)        # coordinates of each patch
    torch.testing.assert_close(coef_NPB @ basis, d.x_NPD / scale, atol=1e-5, rtol=0)  # nothing else in x
    sign = 2.0 * d.y_N.float() - 1.0
    signal_pos = []
    for i in range(n):
        k, kn = d.cluster_N[i].item(), d.noise_cluster_N[i].item()
        nz = coef_NPB[i].abs() > 1e-5                                     # (P, 2K) non-zero coordinates
        assert nz.sum() == 3 and (nz.sum(1) <= 1).all()                   # three one-direction patches
        p_sig, p_cen, p_fn = (int(nz[:, j].nonzero()) for j in (k, K + k, kn))
        alpha = (coef_NPB[i, p_sig, k] * sign[i]).item()                 # y α v_k, α ∈ [0.5, 2]
        beta = coef_NPB[i, p_cen, K + k].item()                           # β c_k, β ∈ [1, 2]
        gamma = coef_NPB[i, p_fn, kn].abs().item()                        # ε γ v_k', γ ∈ [0.5, 3]
        assert 0.5 - 1e-5 <= alpha <= 2 + 1e-5 and 1 - 1e-5 <= beta <= 2 + 1e-5 and 0.5 - 1e-5 <= gamma <= 3 + 1e-5
        signal_pos.append(p_sig)
    assert set(signal_pos) == set(range(P))  # the patch order is shuffled per example


def test_noise_patch_variance_and_shared_vectors():
    D, sigma_p = 20, 2.0
    d = make_chen_data(3000, num_patches=3 + 2, dim=D, sigma_p=sigma_p, scale=1.0, generator=gen(1))
    basis = torch.cat([d.features_KD, d.centres_KD])
    # the squared norm of the part orthogonal to the 2K basis: noise patches contribute σ_p²/d per coordinate
    x = d.x_NPD.reshape(-1, D)
    resid = x - (x @ basis.t()) @ basis
    per_coord = resid.pow(2).sum() / (d.x_NPD.shape[0] * 2 * (D - basis.shape[0]))
    assert abs(per_coord.item() - sigma_p ** 2 / D) < 0.05 * sigma_p ** 2 / D
    test = make_chen_data(10, dim=D, num_patches=5, features=d.vectors, generator=gen(2))
    assert torch.equal(test.features_KD, d.features_KD) and torch.equal(test.centres_KD, d.centres_KD)
    again = make_chen_data(3000, num_patches=5, dim=D, sigma_p=sigma_p, scale=1.0, generator=gen(1))
    assert torch.equal(again.x_NPD, d.x_NPD)


def test_orthonormal_vectors_are_gram_schmidt():
    v = orthonormal_vectors(4, 9, gen(3))
    g = torch.randn(9, 4, generator=gen(3), dtype=torch.float64)
    # Gram–Schmidt by hand
    qs = []
    for j in range(4):
        u = g[:, j].clone()
        for q in qs:
            u -= (u @ q) * q
        qs.append(u / u.norm())
    torch.testing.assert_close(v, torch.stack(qs).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("kwargs, word", [
    (dict(num_patches=2), "num_patches"), (dict(num_clusters=1), "num_clusters"),
    (dict(dim=7, num_clusters=4), "dim"), (dict(sigma_p=-1.0), "sigma_p"),
    (dict(gamma_max=0.4), "gamma_max"), (dict(scale=0.0), "scale"),
    (dict(features=(torch.zeros(4, 50), torch.zeros(3, 50))), "features")])
def test_data_argument_errors(kwargs, word):
    with pytest.raises(ValueError, match=word):
        make_chen_data(10, **kwargs)
    with pytest.raises(ValueError, match="n"):
        make_chen_data(0)


# ------------------------------------------------------------------------------- references
def conv_expert(x_NPD, conv, activation, J):
    """The official network: Conv1d(1, 2J, D, stride D) on the flat input, σ, sum over patches, class sums."""
    h = conv(x_NPD.reshape(x_NPD.shape[0], 1, -1))          # (N, 2J, P)
    if activation == "cubic":
        h = h ** 3
    h = h.sum(2)
    return torch.stack([h[:, :J].sum(1), h[:, J:].sum(1)], dim=1)


def make_conv(w_FD, b_F):
    F_, D = w_FD.shape
    conv = nn.Conv1d(1, F_, D, stride=D).to(w_FD.dtype)
    with torch.no_grad():
        conv.weight.copy_(w_FD[:, None, :])
        conv.bias.copy_(b_F)
    return conv


class RefMoE(nn.Module):
    """One run of the official MoE, written the slow obvious way (every expert on every example + one-hot)."""

    def __init__(self, batched: ChenMoE, r: int):
        super().__init__()
        self.J, self.act, self.gate = batched.filters_per_class, batched.activation, batched.gate
        M, D = batched.num_experts, batched.dim
        self.experts = nn.ModuleList(make_conv(batched.expert_w_RMFD[r, m].detach(),
                                               batched.expert_b_RMF[r, m].detach()) for m in range(M))
        self.router = nn.Conv1d(1, M, D, stride=D, bias=False).to(batched.router_w_RMD.dtype)
        with torch.no_grad():
            self.router.weight.copy_(batched.router_w_RMD[r].detach()[:, None, :])

    def forward(self, x_NPD, noise_NM):
        noisy_NM = self.router(x_NPD.reshape(x_NPD.shape[0], 1, -1)).sum(2) + noise_NM
        top_N, ids_N = noisy_NM.max(1)
        if self.gate == "softmax":
            top_N = torch.softmax(noisy_NM, 1)[torch.arange(len(ids_N)), ids_N]
        all_NMC = torch.stack([conv_expert(x_NPD, e, self.act, self.J) for e in self.experts], 1)
        onehot_NM = F.one_hot(ids_N, len(self.experts)).to(x_NPD.dtype)
        return top_N[:, None] * torch.einsum("nm,nmc->nc", onehot_NM, all_NMC), ids_N


def ref_normalized_gd(expert_modules, lr):
    with torch.no_grad():
        for e in expert_modules:
            norm = sum(p.grad.norm() for p in e.parameters())
            for p in e.parameters():
                if norm != 0:
                    p.grad /= norm
                p -= lr * p.grad


def tiny(n=24, D=6, P=4, K=2, seed=0, dtype=torch.float64):
    d = make_chen_data(n, num_clusters=K, num_patches=P, dim=D, generator=gen(seed))
    d.x_NPD = d.x_NPD.to(dtype)
    return d


# ------------------------------------------------------------------------------- experts
@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_patch_expert_equals_conv1d(activation):
    d = tiny()
    w, b = torch.randn(6, 6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    ref = conv_expert(d.x_NPD, make_conv(w, b), activation, 3)
    torch.testing.assert_close(patch_expert_logits(d.x_NPD, w, b, activation), ref)


@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_single_batched_equals_separate_conv1d(activation):
    d = tiny()
    m = ChenSingle(3, dim=6, filters_per_class=4, activation=activation, generators=[gen(s) for s in range(3)]).double()
    out = m(d.x_NPD)
    assert out.shape == (3, 24, 2)
    for r in range(3):
        ref = conv_expert(d.x_NPD, make_conv(m.w_RFD[r].detach(), m.b_RF[r].detach()), activation, 4)
        torch.testing.assert_close(out[r], ref)
    # default Conv1d init: U(-1/√D, 1/√D)
    assert m.w_RFD.abs().max() <= 1 / math.sqrt(6) and m.w_RFD.abs().max() > 0.5 / math.sqrt(6)


def test_cubic_patch_logits_gradcheck():
    x = torch.randn(5, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True) * 0.5
    b = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    w = w.detach().requires_grad_()
    # chunk 2 < N = 5 exercises the chunk loop and a ragged last chunk
    assert torch.autograd.gradcheck(lambda x, w, b: cubic_patch_logits(x, w, b, chunk=2), (x, w, b))
    with torch.no_grad():
        ref = torch.stack([(torch.einsum("npd,fd->npf", x, w[r]) + b[r]).pow(3).sum(1).view(5, 2, 3).sum(-1)
                           for r in range(2)])
        torch.testing.assert_close(cubic_patch_logits(x, w, b, chunk=2), ref)


# ----------------------------------------------------------------------------------- MoE
@pytest.mark.parametrize("activation", ["cubic", "linear"])
@pytest.mark.parametrize("gate", ["logit", "softmax"])
def test_moe_batched_forward_equals_reference(activation, gate):
    d = tiny()
    R, M, N = 3, 4, len(d)
    moe = ChenMoE(R, dim=6, num_experts=M, filters_per_class=2, activation=activation, gate=gate,
                  expert_init_scale=1.0, generators=[gen(s) for s in range(R)]).double()
    with torch.no_grad():  # a non-zero router so that routing depends on x
        moe.router_w_RMD.copy_(torch.randn(R, M, 6, generator=gen(9), dtype=torch.float64) * 0.1)
    noise = torch.rand(R, N, M, generator=gen(5), dtype=torch.float64)
    out = moe(d.x_NPD, noise_RNM=noise)
    assert isinstance(out, MoEOutput) and out.aux_loss.shape == () and out.aux_loss.item() == 0
    for r in range(R):
        ref_y, ref_ids = RefMoE(moe, r)(d.x_NPD, noise[r])
        torch.testing.assert_close(out.y[r], ref_y)
        assert torch.equal(out.metrics["expert_ids"][r], ref_ids)
        assert torch.equal(out.metrics["tokens_per_expert"][r], torch.bincount(ref_ids, minlength=M))
    assert all(not v.requires_grad for v in out.metrics.values())


@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_moe_training_equals_separate_runs(activation):
    """train_moe on R runs == R separate official-style runs (same init, same noise stream)."""
    d = tiny(n=32)
    R, M, steps, lr_e, lr_r = 3, 3, 6, 1e-3, 0.1
    moe = ChenMoE(R, dim=6, num_experts=M, filters_per_class=2, activation=activation,
                  generators=[gen(s) for s in range(R)]).double()
    refs = [RefMoE(moe, r) for r in range(R)]
    train_moe(moe, d, steps=steps, expert_lr=lr_e, router_lr=lr_r, generators=[gen(100 + r) for r in range(R)],
              early_stop=False)
    for r, ref in enumerate(refs):
        g = gen(100 + r)
        opt = torch.optim.SGD(ref.router.parameters(), lr=lr_r)
        for _ in range(steps):
            ref.zero_grad()
            y, _ = ref(d.x_NPD, torch.rand(len(d), M, generator=g).double())
            loss = F.cross_entropy(torch.softmax(y, 1), d.y_N)   # the official double softmax
            loss.backward()
            ref_normalized_gd(ref.experts, lr_e)
            opt.step()
        for m, e in enumerate(ref.experts):
            torch.testing.assert_close(moe.expert_w_RMFD[r, m].detach(), e.weight[:, 0].detach())
            torch.testing.assert_close(moe.expert_b_RMF[r, m].detach(), e.bias.detach())
        torch.testing.assert_close(moe.router_w_RMD[r].detach(), ref.router.weight[:, 0].detach())
    assert moe.router_w_RMD.abs().sum() > 0  # the router did move


def test_moe_loss_hand_values():
    y = torch.tensor([0, 1])
    # F = 0 → softmax (½, ½) → CE of (½, ½) = ln 2; F = (+100, −100) for class 0 → p ≈ (1, 0) → log(1 + 1/e)
    out = torch.tensor([[[0.0, 0.0], [-100.0, 100.0]]])
    loss = moe_loss_R(out, y)
    torch.testing.assert_close(loss, torch.tensor([(math.log(2) + math.log(1 + math.exp(-1))) / 2]))
    torch.testing.assert_close(single_loss_R(out[:, :1], y[:1]), torch.tensor([math.log(2)]))
    # example 0 predicts class 0 (wrong for y = 1), example 1 class 1 (right)
    assert accuracy_R(torch.tensor([[[1.0, 0.0], [-1.0, 1.0]]]), torch.tensor([1, 1])).tolist() == [50.0]


# ---------------------------------------------------------------------------- optimisers
def test_normalized_gd_step_by_hand():
    # R = 2 runs, M = 2 experts; weight (R, M, 1, 2), bias (R, M, 1)
    w = torch.zeros(2, 2, 1, 2, requires_grad=True)
    b = torch.zeros(2, 2, 1, requires_grad=True)
    w.grad = torch.tensor([[[[3.0, 4.0]], [[0.0, 0.0]]], [[[1.0, 0.0]], [[0.0, 2.0]]]])
    b.grad = torch.tensor([[[12.0], [0.0]], [[0.0], [2.0]]])
    normalized_gd_step_([w, b], lr=0.1, active_R=torch.tensor([True, False]))
    # run 0 expert 0: ‖g_w‖ + ‖g_b‖ = 5 + 12 = 17 → w = −0.1·(3, 4)/17, b = −0.1·12/17
    torch.testing.assert_close(w[0, 0, 0], torch.tensor([-0.3 / 17, -0.4 / 17]))
    torch.testing.assert_close(b[0, 0], torch.tensor([-1.2 / 17]))
    # run 0 expert 1 has zero gradient: unchanged (no division by 0); run 1 is inactive: unchanged
    assert w[0, 1].abs().sum() == 0 and b[0, 1].abs().sum() == 0 and w[1].abs().sum() == 0 and b[1].abs().sum() == 0
    normalized_gd_step_([w, b], lr=0.1)
    # run 1 expert 1: ‖(0, 2)‖ + ‖2‖ = 4 → w = −0.1·(0, 2)/4, b = −0.1·2/4
    torch.testing.assert_close(w[1, 1, 0], torch.tensor([0.0, -0.05]))
    torch.testing.assert_close(b[1, 1], torch.tensor([-0.05]))
    p = torch.ones(2, 3, requires_grad=True)
    p.grad = torch.ones(2, 3)
    sgd_step_([p], 0.5, torch.tensor([False, True]))
    assert p[0].tolist() == [1, 1, 1] and p[1].tolist() == [0.5, 0.5, 0.5]


def test_run_adam_matches_torch_adam_and_freezes():
    torch.manual_seed(0)
    p0 = torch.randn(2, 3, 4)
    mine = p0.clone().requires_grad_()
    refs = [p0[r].clone().requires_grad_() for r in range(2)]
    opt = RunAdam([mine], lr=0.01, weight_decay=5e-4)
    ref_opts = [torch.optim.Adam([q], lr=0.01, weight_decay=5e-4) for q in refs]
    for t in range(5):
        g = torch.randn(2, 3, 4)
        mine.grad = g.clone()
        active = torch.tensor([True, t < 3])  # run 1 stops after 3 steps
        opt.step(active)
        for r in range(2):
            if active[r]:
                refs[r].grad = g[r].clone()
                ref_opts[r].step()
    for r in range(2):
        torch.testing.assert_close(mine[r].detach(), refs[r].detach())


@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_single_training_equals_separate_adam_runs(activation):
    d = tiny(n=20)
    R, steps = 2, 4
    m = ChenSingle(R, dim=6, filters_per_class=3, activation=activation, generators=[gen(s) for s in range(R)]).double()
    convs = [make_conv(m.w_RFD[r].detach(), m.b_RF[r].detach()) for r in range(R)]
    train_single(m, d, steps=steps, lr=0.01, early_stop=False)
    for r, conv in enumerate(convs):
        opt = torch.optim.Adam(conv.parameters(), lr=0.01, weight_decay=5e-4)
        for _ in range(steps):
            opt.zero_grad()
            F.cross_entropy(conv_expert(d.x_NPD, conv, activation, 3), d.y_N).backward()
            opt.step()
        torch.testing.assert_close(m.w_RFD[r].detach(), conv.weight[:, 0].detach())
        torch.testing.assert_close(m.b_RF[r].detach(), conv.bias.detach())


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


def test_train_moe_logs_and_stops():
    d = tiny(n=32, dtype=torch.float32)
    moe = ChenMoE(2, dim=6, num_experts=3, filters_per_class=2, generators=[gen(0), gen(1)])
    log = train_moe(moe, d, steps=30, generators=[gen(2), gen(3)])
    assert log.losses_RS.shape == (2, 30) and torch.isfinite(log.losses_RS).all()
    assert (log.stopped_R <= 30).all() and (log.stopped_R >= 1).all()
    assert abs(log.losses_RS[0, 0].item() - math.log(2)) < 1e-3  # tiny experts: F ≈ 0 → loss ≈ ln 2


def test_model_argument_errors():
    with pytest.raises(ValueError, match="activation"):
        ChenSingle(1, activation="relu")
    with pytest.raises(ValueError, match="gate"):
        ChenMoE(1, gate="sigmoid")
    with pytest.raises(ValueError, match="generators"):
        ChenMoE(2, generators=[gen(0)])
    with pytest.raises(ValueError, match="x_NPD"):
        ChenMoE(1, dim=6)(torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="noise_RNM"):
        ChenMoE(1, dim=6, num_experts=2)(torch.zeros(3, 4, 6), noise_RNM=torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match="lr"):
        RunAdam([torch.zeros(1, 2)], lr=0.0)
