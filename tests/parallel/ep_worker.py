"""Worker for the expert-parallel tests, launched under ``torchrun --nproc-per-node N``.

    ep_worker.py equivalence OUT_DIR          # EP (and EP×DP) == one process, fp64
    ep_worker.py save MODEL_SEED CKPT         # build the reference model, shard it, save
    ep_worker.py reload CKPT OUT_DIR          # load at this EP size, write outputs, save again

Each rank writes what it checked to OUT_DIR/rank<r>.json (the test reads those files); any failed
check raises, so the launch exits non-zero.
Legend: W world size, T tokens per rank, D dim, E experts.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moekit import MoE, checkpoint
from moekit.parallel import expert_parallel, sync_gradients

D, H, E, T = 6, 10, 8, 12
CONFIGS = {
    "topk": dict(router="topk", top_k=2, w_z=1e-3),
    "sigmoid_shared": dict(router="sigmoid", top_k=2, num_shared_experts=1, router_options={"bias_update_rate": 0.1}),
    "switch_capacity": dict(router="switch", capacity_factor=1.0),
}


def close(a, b, what, tol=1e-6):
    err = (a - b).abs().max().item() if a.numel() else 0.0
    if not err <= tol:
        raise AssertionError(f"{what}: max |diff| {err:.3g} > {tol}")
    return err


def global_batch(W, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(W * T, D, generator=g, dtype=torch.float64), torch.randn(W * T, D, generator=g,
                                                                                   dtype=torch.float64)


def check_equivalence(name, mesh, W, rank, dp_rank, ep_size):
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
    # reference: the whole global batch in one process
    xr = X.clone().requires_grad_()
    out_r = ref(xr)
    loss_r = (out_r.y - target).square().sum(-1).mean() + out_r.aux_loss
    loss_r.backward()
    # this rank's slice
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
        dist.all_reduce(aux)
        aux /= W
    errs["aux"] = close(aux, out_r.aux_loss.detach(), f"{name}: aux loss")
    info = ep.ep
    ref_params = dict(ref.named_parameters())
    for pname, p in ep.named_parameters():
        g_ref = ref_params[pname].grad
        if pname.startswith("experts."):
            g_ref = g_ref[info.first:info.first + info.num_local]
        errs[f"grad {pname}"] = close(p.grad, g_ref, f"{name}: gradient of {pname}")
    if name == "sigmoid_shared":                 # bias update from all-reduced counts
        ref.router.update_bias(out_r.metrics["tokens_per_expert"])
        ep.router.update_bias(out_e.metrics["tokens_per_expert"])
        errs["bias"] = close(ep.router.expert_bias, ref.router.expert_bias, "sigmoid bias")
        biases = [torch.empty_like(ep.router.expert_bias) for _ in range(W)]
        dist.all_gather(biases, ep.router.expert_bias)
        assert all(torch.equal(b, biases[0]) for b in biases), "bias differs across ranks"
    return errs


def equivalence(out_dir):
    W, rank = dist.get_world_size(), dist.get_rank()
    results = {}
    meshes = {"ep": (init_device_mesh("cpu", (W,)), rank, W)}
    if W == 4:
        meshes["dp2xep2"] = (init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "ep")), rank // 2, 2)
    for mesh_name, (mesh, dp_rank, ep_size) in meshes.items():
        for name in CONFIGS:
            results[f"{mesh_name}/{name}"] = check_equivalence(name, mesh, W, rank, dp_rank, ep_size)
    # E not divisible by the EP size: a ValueError naming both
    try:
        expert_parallel(MoE(D, H, W + 1 if W > 1 else 3, expert="mlp"), init_device_mesh("cpu", (W,)))
        results["indivisible"] = "no error" if W > 1 else "ok"
    except ValueError as e:
        results["indivisible"] = str(e)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def model(seed):
    torch.manual_seed(seed)
    m = torch.nn.Sequential(torch.nn.Linear(D, D), MoE(D, H, E, router="topk", top_k=2, expert="glu"),)
    return m


def run_model(m, x):
    h = m[0](x)
    return m[1](h).y


def save_cmd(seed, ckpt):
    W = dist.get_world_size()
    m = model(int(seed))
    expert_parallel(m, init_device_mesh("cpu", (W,)))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    X, _ = global_batch(1, seed=5)
    loss = run_model(m, X.float()).square().mean()
    loss.backward()
    sync_gradients(m)
    opt.step()                                       # non-trivial optimizer state, sharded
    checkpoint.save(m, ckpt, optimizer=opt, extra={"step": 1, "world": W})


def reload_cmd(ckpt, out_dir):
    W, rank = dist.get_world_size(), dist.get_rank()
    m = model(123)                                   # different init: everything must come from the file
    expert_parallel(m, init_device_mesh("cpu", (W,)))
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    extra = checkpoint.load(m, ckpt, optimizer=opt)
    X, _ = global_batch(1, seed=6)
    with torch.no_grad():
        y = run_model(m, X.float())                   # every rank: the same full batch
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({"y": y.tolist(), "extra": extra}))
    checkpoint.save(m, Path(out_dir) / "resaved.safetensors", optimizer=opt, extra=extra)


def main(argv):
    dist.init_process_group("gloo")
    try:
        cmd, *args = argv
        {"equivalence": equivalence, "save": save_cmd, "reload": reload_cmd}[cmd](*args)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
    # Everything is written and the process group is destroyed. Leave without interpreter finalization:
    # gloo's worker threads can still be torn down during it, which now and then aborts the process
    # ("terminate called without an active exception") after all the work succeeded.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
