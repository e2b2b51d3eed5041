"""ViT / V-MoE: shapes, MoE placement, V-MoE losses, capacity and Batch Priority Routing, gradients, errors.

Legend: B images, N tokens per image, T tokens in the batch (B·N), D dim, E experts, K experts per token, L classes.
"""
import math

import pytest
import torch

from moekit.layers.moe import MoE
from moekit.repro.models.vit import ViT, resolve_moe_layers
from moekit.types import MoEOutput


def _model(**kw):
    opts = dict(image_size=8, patch_size=2, in_channels=1, num_classes=5, dim=16, depth=4, heads=2, mlp_dim=32,
                num_experts=4, top_k=2, group_images=None)     # one routing group: the slow reference's setting
    opts.update(kw)
    torch.manual_seed(opts.pop("seed", 0))
    return ViT(**opts)


def _images(B=6, seed=1):
    return torch.randn(B, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _capture_routing(model):
    """Forward hooks recording, for each MoE block, its input (T, D), routing decision and output (T, D)."""
    records = []
    hooks = []
    for moe in model.moe_modules():
        rec = {}
        records.append(rec)
        hooks.append(moe.router.register_forward_hook(lambda _m, _i, d, rec=rec: rec.update(decision=d)))
        hooks.append(moe.register_forward_hook(
            lambda m, i, out, rec=rec: rec.update(x=i[0].reshape(-1, m.dim), y=out.y.reshape(-1, m.dim))))
    return records, hooks


def _slow_capacity_moe(moe, x_TD, decision, capacity_factor, batch_priority):
    """Capacity-limited MoE written out token by token: serve slot 0 of every token, then slot 1, ...;
    within a slot in token order, or (BPR) by descending top gate; an expert keeps its first C assignments."""
    T, K = decision.expert_ids.shape
    C = max(1, math.ceil(T * K * capacity_factor / moe.num_experts))
    prio = decision.weights.max(dim=-1).values.tolist()
    order = sorted(range(T), key=lambda t: -prio[t]) if batch_priority else list(range(T))
    used = [0] * moe.num_experts
    keep = torch.zeros(T, K, dtype=torch.bool)
    for slot in range(K):
        for t in order:
            e = int(decision.expert_ids[t, slot])
            if used[e] < C:
                keep[t, slot] = True
                used[e] += 1
    out_ETD = moe.experts.forward_dense(x_TD)          # every expert on every token
    y_TD = torch.zeros_like(x_TD)
    for t in range(T):
        for slot in range(K):
            if keep[t, slot]:
                e = int(decision.expert_ids[t, slot])
                y_TD[t] += decision.weights[t, slot] * out_ETD[e, t]
    return y_TD, keep


# ---- structure ---------------------------------------------------------------------------------------
def test_shapes_and_output_type():
    for pool in ("cls", "mean"):
        model = _model(pool=pool)
        out = model(_images(3))
        assert isinstance(out, MoEOutput)
        assert out.y.shape == (3, 5) and out.aux_loss.shape == ()
        assert out.metrics["moe0/tokens_per_expert"].shape == (4,)
        assert {"moe0/importance_loss", "moe1/importance_loss", "dropped_fraction"} <= set(out.metrics)
        assert not any(v.requires_grad for v in out.metrics.values())


def test_which_blocks_are_moe():
    assert resolve_moe_layers("every_other", 6) == [1, 3, 5]
    assert resolve_moe_layers("last_n", 6, last_n=2) == [3, 5]
    assert resolve_moe_layers([2, 0], 6) == [0, 2]
    model = _model(depth=6)
    assert model.moe_layers == [1, 3, 5]
    assert [b.is_moe for b in model.blocks] == [False, True, False, True, False, True]
    assert all(isinstance(b.moe, MoE) and b.mlp is None for b in model.blocks if b.is_moe)
    assert all(b.moe is None and b.mlp is not None for b in model.blocks if not b.is_moe)
    model = _model(depth=6, moe_layers="last_n", last_n=1)
    assert [b.is_moe for b in model.blocks] == [False] * 5 + [True]
    model = _model(moe_layers=[0, 2])
    assert [b.is_moe for b in model.blocks] == [True, False, True, False]


def test_moe_blocks_use_the_vmoe_router():
    model = _model(num_experts=5, top_k=2, capacity_factor=1.05)
    for moe in model.moe_modules():
        r = moe.router
        assert type(r).__name__ == "VMoERouter" and r.renormalize is False
        assert r.noise_std == pytest.approx(1 / 5)
        assert r.w_importance == 0.005 and r.w_load == 0.005 and r.w_switch == 0.0 and r.w_z == 0.0
        assert moe.capacity_factor == 1.05 and moe.top_k == 2
        assert r.gate.bias is None


def test_dense_vit_when_no_experts_or_no_moe_layers():
    a, b = _model(num_experts=0), _model(moe_layers=[])
    for model in (a, b):
        assert model.moe_modules() == [] and model.moe_layers == []
        out = model(_images(2))
        assert out.y.shape == (2, 5) and out.metrics == {}
        assert out.aux_loss.shape == () and float(out.aux_loss) == 0.0
        model.set_capacity_factor(0.5)          # nothing to set: a no-op
    assert sum(p.numel() for p in a.parameters()) == sum(p.numel() for p in b.parameters())


# ---- losses ------------------------------------------------------------------------------------------
def test_aux_loss_is_vmoe_importance_plus_load_summed_over_blocks():
    model = _model(num_experts=4, top_k=2).train()
    records, hooks = _capture_routing(model)
    out = model(_images(4))
    for h in hooks:
        h.remove()
    expected = torch.zeros(())
    for moe, rec in zip(model.moe_modules(), records):
        d, x_TD = rec["decision"], rec["x"]
        k, sigma = 2, 1 / 4                                   # noise std 1/E
        clean_TE = x_TD @ moe.router.gate.weight.t()
        torch.testing.assert_close(d.logits, clean_TE, rtol=1e-5, atol=1e-5)
        noisy_TE = d.noisy_logits
        assert noisy_TE is not None and not torch.equal(noisy_TE, clean_TE)      # training noise
        # importance: clean softmax over all experts, summed over tokens, CV² (population std)
        imp_E = torch.softmax(clean_TE, -1).sum(0)
        l_imp = imp_E.var(unbiased=False) / imp_E.mean() ** 2
        # load: p_i(x) = 1 − Φ((k-th largest noisy logit − clean_i) / σ), averaged over tokens, CV²
        thr_T = noisy_TE.sort(-1, descending=True).values[:, k - 1]
        normal = torch.distributions.Normal(0.0, 1.0)
        load_E = (1 - normal.cdf((thr_T[:, None] - clean_TE) / sigma)).mean(0)
        l_load = load_E.var(unbiased=False) / load_E.mean() ** 2
        expected = expected + 0.005 * (l_imp + l_load)
    torch.testing.assert_close(out.aux_loss, expected, rtol=1e-4, atol=1e-7)
    from_metrics = sum(0.005 * (out.metrics[f"moe{i}/importance_loss"] + out.metrics[f"moe{i}/load_loss"])
                       for i in range(2))
    torch.testing.assert_close(out.aux_loss.detach(), from_metrics, rtol=1e-5, atol=1e-8)
    assert float(out.aux_loss.detach()) > 0


def test_eval_is_deterministic_and_has_no_load_loss():
    model = _model().eval()
    x = _images(3)
    a, b = model(x), model(x)
    torch.testing.assert_close(a.y, b.y, rtol=0, atol=0)
    assert "moe0/load_loss" not in a.metrics            # no noise in eval: V-MoE's load loss is undefined
    torch.testing.assert_close(a.aux_loss, 0.005 * (a.metrics["moe0/importance_loss"]
                                                    + a.metrics["moe1/importance_loss"]))


# ---- capacity and Batch Priority Routing --------------------------------------------------------------
def test_set_capacity_factor_changes_dropped_fraction():
    model = _model(num_experts=4, top_k=2).eval()
    x = _images(8)
    fractions = []
    for c in (None, 2.0, 1.0, 0.5, 0.25):
        model.set_capacity_factor(c)
        out = model(x)
        fractions.append(float(out.metrics["dropped_fraction"]))
        if c is not None:
            T, slots = 8 * 17, 4 * math.ceil(8 * 17 * 2 * c / 4)
            assert fractions[-1] >= max(0.0, 1 - slots / (T * 2)) - 1e-6   # E·C slots for T·k assignments
    assert fractions[0] == 0.0 and fractions[1] == 0.0
    assert fractions[2] <= fractions[3] <= fractions[4]
    assert fractions[4] >= 0.74 and fractions[3] >= 0.49
    # the overall fraction is the pooled per-block fraction
    per_block = [out.metrics[f"moe{i}/dropped_assignments"] for i in range(2)]
    assert float(out.metrics["dropped_fraction"]) == pytest.approx(float(sum(per_block)) / (2 * 8 * 17 * 2))


@pytest.mark.parametrize("batch_priority", [False, True])
@pytest.mark.parametrize("top_k", [1, 2])
def test_capacity_routing_matches_slow_reference(batch_priority, top_k):
    model = _model(num_experts=4, top_k=top_k, capacity_factor=0.3, batch_priority=batch_priority).eval()
    records, hooks = _capture_routing(model)
    with torch.no_grad():
        model(_images(5))
    for h in hooks:
        h.remove()
    for i, rec in enumerate(records):
        y_ref, keep = _slow_capacity_moe(model.moe_modules()[i], rec["x"], rec["decision"], 0.3, batch_priority)
        assert (~keep).any()                                           # the test exercises dropping
        torch.testing.assert_close(rec["y"], y_ref, rtol=1e-4, atol=1e-5)


def test_bpr_keeps_the_high_priority_tokens_at_small_capacity():
    # top-1 so that each token has one assignment: under BPR every kept token of an expert must have a
    # higher top gate than every dropped token of that expert; vanilla keeps the earliest tokens instead.
    model = _model(num_experts=4, top_k=1, capacity_factor=0.25).eval()
    x = _images(8)
    results = {}
    for bpr in (False, True):
        model.set_batch_priority(bpr)
        records, hooks = _capture_routing(model)
        with torch.no_grad():
            model(x)
        for h in hooks:
            h.remove()
        rec = records[0]                        # first MoE block: same input for both modes
        d = rec["decision"]
        kept_T = ~(rec["y"] == 0).all(-1)       # a dropped top-1 token gets an all-zero MoE output
        prio_T, ids_T = d.weights[:, 0], d.expert_ids[:, 0]
        assert 0 < int(kept_T.sum()) < kept_T.numel()
        for e in range(4):
            mine = ids_T == e
            k_, d_ = prio_T[mine & kept_T], prio_T[mine & ~kept_T]
            if k_.numel() and d_.numel():
                if bpr:
                    assert float(k_.min()) >= float(d_.max())
                else:
                    pos = torch.arange(ids_T.numel())
                    assert int(pos[mine & kept_T].max()) < int(pos[mine & ~kept_T].min())
        results[bpr] = float(prio_T[kept_T].mean())
    assert results[True] > results[False]      # BPR keeps the more confident tokens


def test_set_batch_priority_validation():
    model = _model()
    with pytest.raises(ValueError, match="batch_priority"):
        model.set_batch_priority(True)                    # no capacity yet
    with pytest.raises(TypeError, match="flag"):
        model.set_batch_priority(1)
    model.set_capacity_factor(0.5)
    model.set_batch_priority(True)
    assert all(m.batch_priority for m in model.moe_modules())
    with pytest.raises(ValueError, match="capacity_factor"):
        model.set_capacity_factor(None)                   # BPR on: disable it first
    model.set_batch_priority(False)
    model.set_capacity_factor(None)
    assert all(m.capacity_factor is None and not m.batch_priority for m in model.moe_modules())


# ---- gradients and the reference dispatch ---------------------------------------------------------------
@pytest.mark.parametrize("capacity_factor", [None, 1.0])
def test_every_parameter_gets_a_gradient(capacity_factor):
    model = _model(capacity_factor=capacity_factor).train()
    out = model(_images(8))
    (torch.nn.functional.cross_entropy(out.y, torch.arange(8) % 5) + out.aux_loss).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert missing == []


def test_sorted_dispatch_matches_reference_outputs_and_gradients():
    x = _images(4)
    grads, outs = [], []
    for dispatch in ("sorted", "reference"):
        model = _model(dispatch=dispatch, capacity_factor=0.5, batch_priority=True).train()
        torch.manual_seed(5)                              # same router noise for both
        out = model(x)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append(out)
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    torch.testing.assert_close(outs[0].y, outs[1].y, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(outs[0].aux_loss, outs[1].aux_loss, rtol=1e-5, atol=1e-7)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-5, msg=n)


def test_attention_matches_manual_softmax_attention():
    model = _model()
    attn = model.blocks[0].attn
    x_BND = torch.randn(2, 17, 16)
    B, N, D, h = 2, 17, 16, 2
    q, k, v = attn.qkv(x_BND).split(D, dim=-1)
    heads = lambda t: t.view(B, N, h, D // h).transpose(1, 2)
    w = torch.softmax(heads(q) @ heads(k).transpose(-1, -2) / math.sqrt(D // h), dim=-1)
    y = attn.proj((w @ heads(v)).transpose(1, 2).reshape(B, N, D))
    torch.testing.assert_close(attn(x_BND), y, rtol=1e-5, atol=1e-6)


# ---- bad arguments ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(patch_size=3), "patch_size"),
    (dict(heads=3), "heads"),
    (dict(dim=0), "dim"),
    (dict(num_experts=-1), "num_experts"),
    (dict(moe_layers="every_third"), "moe_layers"),
    (dict(moe_layers=[0, 4]), "moe_layers"),
    (dict(moe_layers=[1, 1]), "moe_layers"),
    (dict(moe_layers="last_n"), "last_n"),
    (dict(moe_layers="last_n", last_n=3), "last_n"),
    (dict(last_n=1), "last_n"),
    (dict(pool="max"), "pool"),
    (dict(top_k=5), "top_k"),
    (dict(batch_priority=True), "batch_priority"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(dropout=1.5), "dropout"),
])
def test_bad_arguments_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        _model(**kw)


def test_bad_inputs_raise():
    model = _model()
    with pytest.raises(ValueError, match="x"):
        model(torch.randn(2, 1, 6, 6))
    with pytest.raises(TypeError, match="x"):
        model([[0.0]])
    with pytest.raises(TypeError, match="moe_layers"):
        _model(moe_layers=1)


@pytest.mark.parametrize("batch_priority", [False, True])
def test_routes_per_group_of_images(batch_priority):
    # V-MoE routes per group of images: with groups of 2 images, a batch of 6 gives the same logits as
    # three batches of 2 (every other layer works per image); a last smaller group is its own group.
    model = _model(group_images=2, capacity_factor=0.5, batch_priority=batch_priority).eval()
    assert model.moe_modules()[0].group_size == 2 * 17
    x = _images(7)
    out = model(x)
    parts = [model(x[i:i + 2]) for i in range(0, 7, 2)]
    torch.testing.assert_close(out.y, torch.cat([p.y for p in parts]), rtol=1e-5, atol=1e-6)
    assert float(out.metrics["dropped_fraction"]) > 0
    assert ViT(8, 2, 1, 5, dim=16, heads=2, mlp_dim=32).moe_modules()[0].group_size == 8 * 17   # default 8
