import pytest
import torch

from moekit import losses as L
from moekit.layers.hierarchical import HierarchicalMoE


def _randomise(m):
    with torch.no_grad():
        for r in [m.primary, *m.secondary]:     # gate and noise matrices (zero-initialised)
            r.gate.weight.normal_()
            r.noise.weight.normal_()


def test_output_is_the_two_level_mixture():
    torch.manual_seed(0)
    m = HierarchicalMoE(6, 8, num_groups=3, experts_per_group=4, top_k_groups=2, top_k_experts=2).eval()
    _randomise(m)
    x = torch.randn(5, 6)
    out = m(x)
    # Explicit Σ_i Σ_j G_i G_ij E_ij(x) with renormalised top-k softmaxes at both levels.
    all_ETD = m.experts.forward_dense(x)
    ref = torch.zeros_like(x)
    for t in range(5):
        lp = x[t] @ m.primary.gate.weight.t()
        v, gi = lp.topk(2)
        gp = torch.softmax(v, -1)
        for a in range(2):
            ls = x[t] @ m.secondary[int(gi[a])].gate.weight.t()
            v2, gj = ls.topk(2)
            gs = torch.softmax(v2, -1)
            for b in range(2):
                ref[t] += gp[a] * gs[b] * all_ETD[gi[a] * 4 + gj[b], t]
    torch.testing.assert_close(out.y, ref, rtol=1e-5, atol=1e-5)


def test_importance_and_load_losses_follow_the_paper():
    torch.manual_seed(1)
    m = HierarchicalMoE(6, 8, 2, 3, 1, 1, w_importance=0.1, w_load=0.2).eval()
    _randomise(m)
    x = torch.randn(40, 6)
    out = m(x)
    # Without noise (eval), Load_H_ij = count_primary_i * count_ij / count_primary_i = count_ij.
    torch.testing.assert_close(out.metrics["group_load"].sum(), torch.tensor(40.0))
    counts = out.metrics["tokens_per_expert"]
    torch.testing.assert_close(out.metrics["load_loss"], L.cv_squared(counts))
    torch.testing.assert_close(out.aux_loss.detach(), 0.1 * out.metrics["importance_loss"] + 0.2 * out.metrics["load_loss"])


def test_train_gradients_reach_every_gate_matrix():
    torch.manual_seed(2)
    m = HierarchicalMoE(6, 8, 3, 4, 2, 2).train()
    _randomise(m)
    out = m(torch.randn(64, 6))
    (out.y.square().mean() + out.aux_loss).backward()
    for n, p in m.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


def test_fast_equals_reference_dispatch():
    torch.manual_seed(3)
    a = HierarchicalMoE(6, 8, 3, 4, 2, 2).eval()
    _randomise(a)
    b = HierarchicalMoE(6, 8, 3, 4, 2, 2, dispatch="reference").eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 9, 6)
    torch.testing.assert_close(a(x).y, b(x).y, rtol=1e-5, atol=1e-5)


def test_bad_arguments():
    with pytest.raises(ValueError, match="top_k"):
        HierarchicalMoE(6, 8, 3, 4, top_k_groups=4)
    with pytest.raises(ValueError, match="w_load"):
        HierarchicalMoE(6, 8, 3, 4, w_load=-1)


def test_mask_and_generator():
    torch.manual_seed(4)
    m = HierarchicalMoE(6, 8, 3, 4, 2, 2).train()
    _randomise(m)
    x = torch.randn(12, 6)
    mask = torch.arange(12) < 8
    g = lambda: torch.Generator().manual_seed(7)
    out = m(x, mask=mask, generator=g())
    assert (out.y[8:] == 0).all()
    again = m(x, mask=mask, generator=g())
    torch.testing.assert_close(out.y, again.y, rtol=0, atol=0)
    m.eval()
    torch.testing.assert_close(m(x, mask=mask).y[:8], m(x[:8]).y)
    torch.testing.assert_close(m(x, mask=mask).aux_loss, m(x[:8]).aux_loss)


def test_secondary_gates_run_only_for_the_chosen_groups(monkeypatch):
    # P = 8 groups, each token routed to K1 = 1: the secondary gate GEMMs see T rows, not T·P.
    import moekit.layers.hierarchical as H
    rows = []
    real = H.grouped_mm

    def counting(x, w, counts, **kw):
        rows.append(x.shape[0])
        return real(x, w, counts, **kw)
    monkeypatch.setattr(H, "grouped_mm", counting)
    torch.manual_seed(5)
    m = HierarchicalMoE(6, 8, num_groups=8, experts_per_group=2, top_k_groups=1, top_k_experts=1).train()
    _randomise(m)
    out = m(torch.randn(10, 6))
    assert rows == [10, 10]                     # clean and noise logits, one row per (token, chosen group)
    out.y.square().sum().backward()
    chosen = set(out.metrics["tokens_per_expert"].nonzero()[:, 0].div(2, rounding_mode="floor").tolist())
    for i, r in enumerate(m.secondary):         # an unchosen group's gate gets no gradient
        if i not in chosen:
            assert r.gate.weight.grad is None or r.gate.weight.grad.abs().sum() == 0
