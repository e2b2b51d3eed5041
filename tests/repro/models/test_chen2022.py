"""Chen et al. 2022 models: batched-over-runs experts and MoE vs plain references (the data generator is
tested in tests/datasets/test_chen_clusters.py, the training recipes in tests/experiments/test_chen2022.py).

Legend: R runs, N examples, P patches, D patch dim, K clusters, M experts, F filters (2J), C classes.
"""
import math

import pytest
import torch

from moekit.repro.models.chen2022 import ChenMoE, ChenSingle, cubic_patch_logits, patch_expert_logits
from moekit.types import MoEOutput

from chen_reference import RefMoE, conv_expert, gen, make_conv, tiny


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


@pytest.mark.parametrize("activation", ["cubic", "linear"])
def test_moe_dispatch_equals_dense_reference_dispatcher(activation):
    # the core local dispatcher + grouped patch experts == every expert on every example (dense oracle)
    from moekit.dispatch import ReferenceDispatcher
    torch.manual_seed(0)
    moe = ChenMoE(3, dim=6, num_experts=4, filters_per_class=2, activation=activation, expert_init_scale=1.0)
    with torch.no_grad():
        moe.router_w_RMD.normal_()
    x = torch.randn(10, 4, 6)
    gate_RN, ids_RN = moe.route(x, noise_RNM=torch.rand(3, 10, 4, generator=torch.Generator().manual_seed(1)))
    fast = moe.dispatch_experts(x, ids_RN, gate_RN)
    g_fast = torch.autograd.grad(fast.square().sum(), [moe.expert_w_RMFD, moe.expert_b_RMF, moe.router_w_RMD],
                                 retain_graph=True)
    ref = moe.dispatch_experts(x, ids_RN, gate_RN, dispatcher=ReferenceDispatcher())
    g_ref = torch.autograd.grad(ref.square().sum(), [moe.expert_w_RMFD, moe.expert_b_RMF, moe.router_w_RMD])
    torch.testing.assert_close(fast, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
