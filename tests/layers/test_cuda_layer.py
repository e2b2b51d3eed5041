"""The MoE layer on a CUDA device (marked ``gpu``, skipped without one): no host synchronisation in a
training step, bitwise-deterministic runs, and the fast dispatch against the reference dispatcher in
float32, bfloat16 and under autocast.

Legend: B batch, L sequence length, D model dim, H hidden units, E experts, T tokens.
"""
import copy
import os
import traceback

import pytest
import torch

from moekit import MoE

# cuBLAS is deterministic only with a fixed workspace; the size is read when cuBLAS first runs in the process
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

DEVICE = "cuda"
pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

B, L, D, H, E = 4, 64, 64, 128, 8

# every token-choice router (options of the current language-model variants where they matter)
TOKEN_CHOICE = {
    "topk": dict(router="topk", top_k=2),
    "switch": dict(router="switch", top_k=1),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "vmoe": dict(router="vmoe", top_k=2),
    "sigmoid_shared": dict(router="sigmoid", top_k=2, num_shared_experts=1),
    "scored": dict(router="scored", top_k=2, router_options={"score": "sigmoid", "selection_bias": True,
                                                            "n_group": 4, "topk_group": 2}),
}


def _layer(dtype=torch.float32, **kwargs) -> MoE:
    torch.manual_seed(0)
    layer = MoE(D, H, E, **kwargs)
    with torch.no_grad():                      # routers that start at zero: give them a real decision
        for p in layer.parameters():
            p.normal_(0.0, p.shape[-1] ** -0.5)
    return layer.to(device=DEVICE, dtype=dtype).train()


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, L, D, generator=g).to(DEVICE, dtype)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[0, 40:] = False                       # right padding
    mask[2, :17] = False                       # left padding
    return x, mask.to(DEVICE)


def _step(layer, x, mask=None, generator=None):
    """One forward+backward; returns (y, input gradient, parameter gradients)."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = layer(x, mask, generator=generator)
    (out.y.float().square().mean() + out.aux_loss.float()).backward()
    grads = {n.removeprefix("_orig_mod."): p.grad for n, p in layer.named_parameters() if p.grad is not None}
    return out.y.detach(), x.grad, grads


def _assert_no_sync(layer, x, mask=None):
    _step(layer, x, mask)                      # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _step(layer, x, mask)
    except RuntimeError as e:
        if "synchroniz" not in str(e):
            raise
        frames = [f for f in traceback.extract_tb(e.__traceback__) if "moekit" in f.filename]
        where = f"{frames[-1].filename.split('src/')[-1]}:{frames[-1].lineno} {frames[-1].line}" if frames else \
            "outside moekit's frames (autograd)"
        pytest.fail(f"host synchronisation at {where}: {str(e).splitlines()[0]}")
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


# ---- (a) no host synchronisation in a training step ---------------------------------------------------

@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("capacity_factor", [None, 1.0], ids=["dropless", "cap1"])
@pytest.mark.parametrize("case", list(TOKEN_CHOICE))
def test_no_host_sync_token_choice(case, capacity_factor, masked):
    layer = _layer(torch.bfloat16, capacity_factor=capacity_factor, **TOKEN_CHOICE[case])
    x, mask = _inputs(torch.bfloat16)
    _assert_no_sync(layer, x, mask if masked else None)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("case", list(TOKEN_CHOICE))
def test_no_host_sync_batch_priority(case, masked):
    layer = _layer(torch.bfloat16, capacity_factor=1.0, batch_priority=True, **TOKEN_CHOICE[case])
    x, mask = _inputs(torch.bfloat16)
    _assert_no_sync(layer, x, mask if masked else None)


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
def test_no_host_sync_soft(masked):
    layer = _layer(torch.bfloat16, router="soft")
    x, mask = _inputs(torch.bfloat16)
    _assert_no_sync(layer, x, mask if masked else None)


# ---- (b) determinism ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_default_layer_is_bitwise_deterministic(dtype):
    was = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        layer = _layer(dtype, top_k=2)
        x, _ = _inputs(dtype)
        y1, gx1, g1 = _step(layer, x)
        y2, gx2, g2 = _step(layer, x)
    finally:
        torch.use_deterministic_algorithms(was)
    assert torch.equal(y1, y2)
    assert torch.equal(gx1, gx2)
    assert g1.keys() == g2.keys() and len(g1) == len(list(layer.parameters()))
    for n in g1:
        assert torch.equal(g1[n], g2[n]), n


# ---- (c) fast dispatch against the reference dispatcher -----------------------------------------------

MATCH = {
    "topk": dict(router="topk", top_k=2),
    "switch_cap": dict(router="switch", top_k=1, capacity_factor=1.0),
    "noisy_topk": dict(router="noisy_topk", top_k=2),
    "sigmoid_shared": dict(router="sigmoid", top_k=2, num_shared_experts=1),
    "scored": TOKEN_CHOICE["scored"],
    "topk_cap_bpr": dict(router="topk", top_k=2, capacity_factor=1.0, batch_priority=True),
    "expert_choice": dict(router="expert_choice"),
    "soft": dict(router="soft"),
}


def _rel(a, b):
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("mode", ["fp32", "bf16", "autocast"])
@pytest.mark.parametrize("case", list(MATCH))
def test_fast_dispatch_matches_reference(case, mode):
    fast = _layer(torch.float32, **MATCH[case])
    ref = MoE(D, H, E, dispatch="reference", **MATCH[case]).to(DEVICE)
    ref.load_state_dict(copy.deepcopy(fast.state_dict()))
    ref.train()
    if mode == "bf16":
        fast = fast.to(torch.bfloat16)
        ref.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in fast.state_dict().items()})
    x, mask = _inputs(torch.float32)
    x_fast = x.to(torch.bfloat16) if mode == "bf16" else x
    gen = lambda: torch.Generator(device=DEVICE).manual_seed(7)     # the same noise draw in both layers
    with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=mode == "autocast"):
        yf, gxf, gf = _step(fast, x_fast, mask, generator=gen())
    yr, gxr, gr = _step(ref, x_fast.float(), mask, generator=gen())
    tol = 1e-4 if mode == "fp32" else 3e-2
    assert gf.keys() == gr.keys()
    errs = {"y": _rel(yf, yr), "x.grad": _rel(gxf, gxr)} | {n: _rel(gf[n], gr[n]) for n in gr}
    worst = max(errs, key=errs.get)
    assert errs[worst] < tol, f"{worst}: relative error {errs[worst]:.2e} (tolerance {tol})"
    assert torch.equal(yf[~mask], torch.zeros_like(yf[~mask]))     # padding: output exactly 0


# ---- (d) torch.compile on CUDA: one graph with a dynamic token count, the eager numbers -----------------

@pytest.mark.parametrize("case", ["topk", "sigmoid_shared", "scored"])
def test_compiled_layer_matches_eager(case):
    torch._dynamo.reset()
    layer = _layer(torch.bfloat16, **TOKEN_CHOICE[case]).eval()      # eval: no noise to differ in
    compiled = torch.compile(layer, fullgraph=True, dynamic=True)
    try:
        for T in (128, 200, 333):
            x = torch.randn(T, D, device=DEVICE, dtype=torch.bfloat16)
            ye, gxe, ge = _step(layer, x)
            yc, gxc, gc = _step(compiled, x)
            errs = {"y": _rel(yc, ye), "x.grad": _rel(gxc, gxe)} | {n: _rel(gc[n], ge[n]) for n in ge}
            worst = max(errs, key=errs.get)
            assert gc.keys() == ge.keys()
            assert errs[worst] < 3e-2, f"T={T} {worst}: relative error {errs[worst]:.2e}"
    finally:
        torch._dynamo.reset()
