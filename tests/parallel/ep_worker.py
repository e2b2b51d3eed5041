"""Worker for the expert-parallel tests, launched N times by ``launch`` in test_expert_parallel.py (the
torchrun environment: RANK / WORLD_SIZE / MASTER_*).

    ep_worker.py equivalence OUT_DIR     # EP (1-D, dp×ep, a sub-mesh) == one process, fp64
    ep_worker.py errors OUT_DIR          # bad input: errors naming the argument
    ep_worker.py invariance OUT_DIR SPEC # one cell of the parallel-configuration matrix (json SPEC)
    ep_worker.py save LAYOUT CKPT        # build the reference model at LAYOUT, train one step, save
    ep_worker.py reload LAYOUT CKPT OUT  # load at LAYOUT (another EP/FSDP size), write outputs, save OUT/ck

Each rank writes what it checked to OUT_DIR/rank<r>.json; a failed check raises, so the launch exits
non-zero. Legend: W ranks of the mesh, T tokens per rank per micro-batch, D dim, E experts.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh

from moekit import MoE
from moekit.parallel import clip_grad_norm_, expert_parallel, fully_shard_moe, replicate_moe, sync_gradients

D, H, E, T = 6, 10, 8, 12
CONFIGS = {
    "topk": dict(router="topk", top_k=2, w_z=1e-3),
    "sigmoid_shared": dict(router="sigmoid", top_k=2, num_shared_experts=1, router_options={"bias_update_rate": 0.1}),
    "scored_bias": dict(router="scored", top_k=2, router_options={"selection_bias": True, "bias_update_rate": 0.1}),
    "switch_capacity": dict(router="switch", capacity_factor=1.0),
}


def close(a, b, what, tol=1e-9):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"{what}: max |diff| {err:.3g} > {tol}")
    return err


def full(t):
    """The whole tensor of a (possibly sharded) parameter or gradient."""
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def global_batch(W, seed=0, n=T):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(W * n, D, generator=g, dtype=torch.float64),
            torch.randn(W * n, D, generator=g, dtype=torch.float64))


def check_equivalence(name, mesh, W, rank):
    """``mesh``: the (sub-)mesh the layer is expert-parallel over; ``rank``: this rank's index in it."""
    kw = dict(CONFIGS[name])
    capacity = "capacity_factor" in kw
    torch.manual_seed(1)
    ref = MoE(D, H, E, expert="mlp", **kw, group_size=T if capacity else None).double().train()
    with torch.no_grad():                       # break ties/symmetry: a non-trivial router
        ref.router.gate.weight.normal_()
    ep = copy.deepcopy(ref)
    ep.group_size = None                        # one rank's batch is one group (== the reference's groups)
    expert_parallel(ep, mesh, global_balance=not capacity)
    X, target = global_batch(W)
    xr = X.clone().requires_grad_()
    out_r = ref(xr)
    loss_r = (out_r.y - target).square().sum(-1).mean() + out_r.aux_loss
    loss_r.backward()
    sl = slice(rank * T, (rank + 1) * T)
    xe = X[sl].clone().requires_grad_()
    out_e = ep(xe)
    loss_e = (out_e.y - target[sl]).square().sum(-1).mean() + out_e.aux_loss
    loss_e.backward()
    sync_gradients(ep)
    errs = {"y": close(out_e.y, out_r.y[sl], f"{name}: outputs"),
            "x_grad": close(xe.grad / W, xr.grad[sl], f"{name}: input gradients")}
    aux = out_e.aux_loss.detach().clone()
    if capacity:                                 # per-rank losses: their mean is the reference's
        dist.all_reduce(aux, group=mesh.get_group() if mesh.ndim == 1 else mesh._flatten().get_group())
        aux /= W
    errs["aux"] = close(aux, out_r.aux_loss.detach(), f"{name}: aux loss")
    ref_params = dict(ref.named_parameters())
    for pname, p in ep.named_parameters():
        errs[f"grad {pname}"] = close(full(p.grad), ref_params[pname].grad, f"{name}: gradient of {pname}")
        if pname.startswith("experts."):
            assert type(p).__name__ in ("DTensor", "Parameter") and hasattr(p, "to_local"), pname
            assert p.to_local().shape[0] == E // mesh["ep"].size(), pname
    if hasattr(ep.router, "bias_group"):         # selection-bias update from the counts over the whole mesh
        ref.router.update_bias(out_r.metrics["tokens_per_expert"])
        ep.router.update_bias(out_e.metrics["tokens_per_expert"])
        errs["bias"] = close(ep.router.expert_bias, ref.router.expert_bias, "selection bias")
        assert ep.router.expert_bias.abs().sum() > 0
    return errs


def equivalence(out_dir):
    W, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    meshes = {"ep": (init_device_mesh("cpu", (W,), mesh_dim_names=("ep",)), W, rank)}
    if W == 4:
        meshes["dp2xep2"] = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")), W, rank)
        # a sub-mesh: two independent 2-rank groups (one "pipeline stage" each); nothing crosses them
        pp = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "ep"))
        meshes["submesh"] = (pp["ep"], 2, rank % 2)
    for mesh_name, (mesh, w, r) in meshes.items():
        for name in CONFIGS:
            results[f"{mesh_name}/{name}"] = check_equivalence(name, mesh, w, r)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _error(fn):
    try:
        fn()
    except (ValueError, TypeError) as e:
        return f"{type(e).__name__}: {e}"
    return "no error"


def errors(out_dir):
    W, rank = dist.get_world_size(), dist.get_rank()
    mesh = init_device_mesh("cpu", (W,), mesh_dim_names=("ep",))
    res = {}
    torch.manual_seed(0)
    res["no_ep_dim"] = _error(lambda: expert_parallel(MoE(D, H, E), init_device_mesh("cpu", (W,),
                                                                                     mesh_dim_names=("dp",))))
    res["indivisible"] = _error(lambda: expert_parallel(MoE(D, H, W + 1), mesh))
    torch.manual_seed(rank)                      # every rank a different init
    res["differ"] = _error(lambda: expert_parallel(MoE(D, H, E), mesh))
    torch.manual_seed(0)
    m = MoE(D, H, E)
    expert_parallel(m, mesh)
    res["twice"] = _error(lambda: expert_parallel(m, mesh))
    torch.manual_seed(0)
    wrapped = nn.parallel.DistributedDataParallel(nn.Sequential(nn.Linear(D, D), MoE(D, H, E)))
    res["wrapped"] = _error(lambda: expert_parallel(wrapped, mesh))
    torch.manual_seed(0)
    untouched = MoE(D, H, E)
    before = {k: v.clone() for k, v in untouched.state_dict().items()}
    res["indivisible_untouched"] = _error(lambda: expert_parallel(nn.Sequential(untouched, MoE(D, H, W + 1)), mesh))
    res["untouched"] = all(torch.equal(before[k], v) for k, v in untouched.state_dict().items()) and \
        not hasattr(untouched.experts.w_in, "to_local")
    # plain DDP / fully_shard over the whole model cannot silently overwrite or mix the expert shards:
    # they refuse the DTensor experts (use replicate_moe / fully_shard_moe)
    torch.manual_seed(0)
    ep_model = expert_parallel(nn.Sequential(nn.Linear(D, D), MoE(D, H, E)), mesh)
    shard = ep_model[1].experts.w_in.to_local().clone()
    from torch.distributed.fsdp import fully_shard
    for key, wrap in (("plain_ddp", lambda: nn.parallel.DistributedDataParallel(ep_model)),
                      ("plain_fsdp", lambda: fully_shard(ep_model, mesh=mesh))):
        try:
            wrap()
            res[key] = "no error"
        except RuntimeError:
            res[key] = "RuntimeError"
    res["shard_kept"] = torch.equal(shard, ep_model[1].experts.w_in.to_local())
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------------
# Parallel-configuration invariance: one process vs (EP × FSDP2 × accumulation × capacity × empty
# experts × activation checkpointing)
class Block(nn.Module):
    def __init__(self, moe_kw, checkpointing):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, H, E, expert="glu", **moe_kw)
        self.out = nn.Linear(D, D)
        self.checkpointing = checkpointing

    def forward(self, x):
        h = self.inp(x)
        if self.checkpointing:
            from torch.utils.checkpoint import checkpoint
            y, aux, tpe = checkpoint(self._moe, h, use_reentrant=False)
        else:
            y, aux, tpe = self._moe(h)
        return self.out(h + y), aux, tpe

    def _moe(self, h):
        o = self.moe(h)
        return o.y, o.aux_loss, o.metrics["tokens_per_expert"]


def make_model(spec):
    moe_kw = {"sigmoid": dict(router="sigmoid", top_k=2, num_shared_experts=1, bias=True,    # expert biases too
                              router_options={"bias_update_rate": 0.05}),
              "capacity": dict(router="topk", top_k=2, capacity_factor=0.75, w_switch=1e-2),
              }[spec["router"]]
    torch.manual_seed(3)
    m = Block(moe_kw, spec.get("checkpointing", False)).double()
    with torch.no_grad():
        m.moe.router.gate.weight.normal_()
        for name, p in m.moe.named_parameters():
            if name.split(".")[-1].startswith("b_"):             # non-zero expert biases
                p.normal_(std=0.1)
        if spec.get("empty") and spec["router"] == "sigmoid":        # experts 0 and E-1 are never chosen
            m.moe.router.expert_bias[0] = -1e3
            m.moe.router.expert_bias[E - 1] = -1e3
    return m


def step(model, batches, targets, micro, max_norm, lr):
    """One training step over ``micro`` micro-batches; returns (loss, grad norm, tokens per expert)."""
    total, tpe = 0.0, 0
    for x, t in zip(batches.chunk(micro), targets.chunk(micro)):
        y, aux, tpe_E = model(x)
        loss = ((y - t).square().sum(-1).mean() + aux) / micro
        loss.backward()
        total += loss.detach()
        tpe = tpe + tpe_E
    return total, tpe


def invariance(out_dir, spec_json):
    spec = json.loads(spec_json)
    W, rank = dist.get_world_size(), dist.get_rank()
    ep_size, micro, fsdp = spec["ep"], spec.get("micro", 1), spec.get("fsdp", False)
    dp = W // ep_size
    capacity = spec["router"] == "capacity"
    Tm = T                      # tokens per rank per micro-batch
    X, target = global_batch(W * micro, seed=11, n=Tm)            # (micro·W·T, D)
    # reference: one process, micro-batch m = the m-th micro-batch of every rank, concatenated
    ref = make_model(spec)
    if capacity:
        ref.moe.group_size = Tm                   # each rank's micro-batch is one routing group
    Xr = X.view(W, micro, Tm, D).transpose(0, 1).reshape(-1, D)
    tr = target.view(W, micro, Tm, D).transpose(0, 1).reshape(-1, D)
    loss_r, tpe_r = step(ref, Xr, tr, micro, None, None)
    norm_r = torch.nn.utils.clip_grad_norm_(ref.parameters(), spec["max_norm"])
    ref_grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    torch.optim.SGD(ref.parameters(), lr=0.5).step()
    ref.moe.router.update_bias(tpe_r) if hasattr(ref.moe.router, "bias_group") else None

    model = make_model(spec)
    if spec.get("dp2d"):                          # two data-parallel dimensions (the second of size 1)
        mesh = init_device_mesh("cpu", (dp, 1, ep_size), mesh_dim_names=("dp", "dp_shard", "ep"))
    else:
        names = ("dp", "ep") if dp > 1 else ("ep",)
        mesh = init_device_mesh("cpu", (dp, ep_size) if dp > 1 else (ep_size,), mesh_dim_names=names)
    expert_parallel(model, mesh, global_balance=not capacity)
    inner = model
    if fsdp:
        fully_shard_moe(model, mesh)
    elif spec.get("ddp"):
        model = replicate_moe(model, mesh)
    Xl = X.view(W, micro * Tm, D)[rank]
    tl = target.view(W, micro * Tm, D)[rank]
    loss, tpe = step(model, Xl, tl, micro, None, None)
    if not fsdp and not spec.get("ddp"):
        sync_gradients(inner)
    norm = clip_grad_norm_(inner, spec["max_norm"])
    res = {}
    dist.all_reduce(loss)                         # the mean of the ranks' losses is the global-batch loss
    loss = loss / W
    res["loss"] = close(loss, loss_r, "loss")
    res["norm"] = close(norm, norm_r, "grad norm")
    for n, p in inner.named_parameters():
        res[f"grad {n}"] = close(full(p.grad), ref_grads[n], f"gradient of {n}")
    torch.optim.SGD(inner.parameters(), lr=0.5).step()
    ref_params = dict(ref.named_parameters())
    for n, p in inner.named_parameters():
        res[f"param {n}"] = close(full(p.detach()), ref_params[n].detach(), f"clipped update of {n}")
    if hasattr(inner.moe.router, "bias_group"):
        inner.moe.router.update_bias(tpe)
        res["bias"] = close(inner.moe.router.expert_bias, ref.moe.router.expert_bias, "bias update")
        if spec.get("empty"):
            assert tpe_r[0] == 0 and tpe_r[E - 1] == 0, tpe_r
    res["clipped"] = float(norm_r) > spec["max_norm"]
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------------
# DCP checkpoints across layouts. LAYOUT: "ep4", "dp2-ep2-fsdp", "ep2", ... (dp × ep = world size)
class CkModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(D, D)
        self.moe = MoE(D, H, E, router="sigmoid", top_k=2, expert="glu", num_shared_experts=1)

    def forward(self, x):
        return self.moe(self.inp(x)).y


def ck_model(seed):
    torch.manual_seed(seed)
    return CkModel()


def ck_run(m, x):
    return m(x)


def place(m, layout):
    parts = dict((p[:2], p[2:]) for p in layout.split("-") if p != "fsdp")
    ep, dp = int(parts["ep"]), int(parts.get("dp", 1))
    mesh = init_device_mesh("cpu", (dp, ep), mesh_dim_names=("dp", "ep")) if dp > 1 else \
        init_device_mesh("cpu", (ep,), mesh_dim_names=("ep",))
    expert_parallel(m, mesh)
    if layout.endswith("fsdp"):
        fully_shard_moe(m, mesh)
    return m


def ck_save(layout, ckpt):
    from moekit import checkpoint
    m = place(ck_model(7), layout)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    X, _ = global_batch(dist.get_world_size(), seed=5)
    x = X.float().view(dist.get_world_size(), T, D)[dist.get_rank()]
    ck_run(m, x).square().mean().backward()
    if not layout.endswith("fsdp"):
        sync_gradients(m)
    opt.step()                                            # non-trivial optimizer state, sharded
    m.moe.router.update_bias(torch.arange(E, dtype=torch.float32))
    checkpoint.save(m, ckpt, optimizer=opt, extra={"step": 1, "layout": layout})


def ck_reload(layout, ckpt, out_dir):
    from moekit import checkpoint
    rank = dist.get_rank()
    m = place(ck_model(123), layout)                      # another init: everything must come from the file
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    extra = checkpoint.load(m, ckpt, optimizer=opt)
    X, _ = global_batch(1, seed=6)
    with torch.no_grad():
        y = ck_run(m, X.float())                          # every rank: the same batch
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"y": y.tolist(), "extra": extra}))
    checkpoint.save(m, Path(out_dir) / "ck", optimizer=opt, extra=extra)


def ck_async(ckpt):
    """async_save, a training step with its collectives while the save runs, result(), reload == saved."""
    from moekit import checkpoint
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("ep",))
    m = expert_parallel(ck_model(7), mesh)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    x = global_batch(1, seed=5 + dist.get_rank())[0].float()
    ck_run(m, x).square().mean().backward()
    sync_gradients(m)
    opt.step()
    saved = {k: (v.to_local() if hasattr(v, "to_local") else v).clone() for k, v in m.state_dict().items()}
    pending = checkpoint.async_save(m, ckpt, optimizer=opt, extra={"step": 1})
    for _ in range(2):                                   # keep training (all-to-all, all-reduce) meanwhile
        ck_run(m, x).square().mean().backward()
        sync_gradients(m)
        opt.step()
    pending.result()
    n = expert_parallel(ck_model(8), mesh)
    assert checkpoint.load(n, ckpt, optimizer=torch.optim.Adam(n.parameters(), lr=1e-2)) == {"step": 1}
    for k, v in n.state_dict().items():
        assert torch.equal(v.to_local() if hasattr(v, "to_local") else v, saved[k]), k


def main(argv) -> int:
    dist.init_process_group("gloo")
    cmd, *args = argv
    {"equivalence": equivalence, "errors": errors, "invariance": invariance, "save": ck_save,
     "reload": ck_reload, "async": ck_async}[cmd](*args)
    return 0


if __name__ == "__main__":
    from moekit.parallel import run_then_end
    run_then_end(lambda: main(sys.argv[1:]))     # barrier, destroy the process groups, flush, exit (moekit.parallel.teardown)
