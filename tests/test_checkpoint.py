"""moekit.checkpoint in one process: round trip, strictness, validation before any change, tied weights,
file modes, crash safety, dtypes and optimizers (the multi-process resharding is in tests/parallel)."""
import json
import os
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from moekit import MoE, checkpoint
from moekit.config import first_difference


def _state(m):
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _trained(seed=0, **kw):
    torch.manual_seed(seed)
    m = MoE(6, 10, 4, top_k=2, **kw)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    out = m(torch.randn(8, 6))
    (out.y.square().mean() + out.aux_loss).backward()
    opt.step()
    return m, opt


def test_round_trip_model_optimizer_rng_extra(tmp_path):
    m, opt = _trained()
    torch.manual_seed(5)
    checkpoint.save(m, tmp_path / "ck", optimizer=opt, extra={"step": 3, "losses": [1.0, 0.5]})
    after_save = torch.rand(3)
    torch.manual_seed(99)
    n, nopt = _trained(seed=1)
    assert checkpoint.load(n, tmp_path / "ck", optimizer=nopt) == {"step": 3, "losses": [1.0, 0.5]}
    assert torch.equal(torch.rand(3), after_save)                      # the saving rank's RNG stream
    assert _same(_state(m), _state(n))
    for p, q in zip(m.parameters(), n.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(opt.state[p][k], nopt.state[q][k]), k
    assert nopt.param_groups[0]["betas"] == (0.9, 0.999) and nopt.param_groups[0]["lr"] == 1e-2
    x = torch.randn(5, 6)
    torch.testing.assert_close(n(x).y, m(x).y, rtol=0, atol=0)


MISMATCHES = [
    (dict(router="scored", router_options={"score": "softmax"}), dict(router="scored", router_options={"score": "sigmoid"})),
    (dict(router="scored", num_experts=8, router_options={"n_group": 4, "topk_group": 2}),
     dict(router="scored", num_experts=8, router_options={"n_group": 4, "topk_group": 3})),
    (dict(router="scored", router_options={"selection_bias": True}), dict(router="scored")),
    (dict(router="scored", router_options={"renormalize": 2.0}), dict(router="scored", router_options={"renormalize": True})),
    (dict(router="scored", router_options={"bias": True}), dict(router="scored")),
    (dict(gate_input=True), dict()),
    (dict(num_shared_experts=1, shared_gate=True), dict(num_shared_experts=1)),
    (dict(expert_options={"limit": 7.0}), dict()),
    (dict(expert_options={"alpha": 1.702}), dict()),
    (dict(bias=True), dict()),
    (dict(capacity=3), dict(capacity=4)),
    (dict(top_k=1), dict()),
    (dict(capacity_factor=1.0), dict()),
    (dict(router="sigmoid"), dict()),
]


@pytest.mark.parametrize("saved_kw,loaded_kw", MISMATCHES, ids=[str(s) for s, _ in MISMATCHES])
def test_a_differently_configured_layer_is_refused_naming_the_field(tmp_path, saved_kw, loaded_kw):
    def build(kw):
        kw = dict(kw)
        E = kw.pop("num_experts", 4)
        kw.setdefault("top_k", 2)
        torch.manual_seed(0)
        return MoE(6, 10, E, **kw)
    a, b = build(saved_kw), build(loaded_kw)
    field = first_difference(a.config.to_dict(), b.config.to_dict())
    assert field is not None
    checkpoint.save(a, tmp_path / "ck")
    before = _state(b)
    with pytest.raises(ValueError, match=re.escape(field)):
        checkpoint.load(b, tmp_path / "ck")
    assert _same(before, _state(b))


def test_extra_and_missing_tensors_are_named(tmp_path):
    torch.manual_seed(0)
    big = nn.Sequential(MoE(6, 10, 4), nn.Linear(6, 6))
    small = nn.Sequential(MoE(6, 10, 4))
    checkpoint.save(big, tmp_path / "big")
    checkpoint.save(small, tmp_path / "small")
    before = _state(small)
    with pytest.raises(ValueError, match=r"not in the module: \['1.bias', '1.weight'\]"):
        checkpoint.load(small, tmp_path / "big")
    assert _same(before, _state(small))
    with pytest.raises(ValueError, match=r"missing from the file: \['1.bias', '1.weight'\]"):
        checkpoint.load(big, tmp_path / "small")


def test_a_failed_load_leaves_the_module_and_says_the_file_is_invalid(tmp_path):
    m, opt = _trained()
    checkpoint.save(m, tmp_path / "ck", optimizer=opt)
    n, nopt = _trained(seed=1)
    before = _state(n)
    opt_before = {k: v.clone() for k, v in nopt.state[next(iter(n.parameters()))].items()}
    real = tmp_path / "ck"
    rng = real / "rng" / "rank0.json"
    rng.write_text(json.dumps({"cpu": "bm90IGFuIFJORyBzdGF0ZQ=="}))               # decodes, wrong size
    with pytest.raises(ValueError, match="not a valid moekit checkpoint.*RNG"):
        checkpoint.load(n, real, optimizer=nopt)
    rng.write_text("{broken")
    with pytest.raises(ValueError, match="not a valid moekit checkpoint.*RNG"):
        checkpoint.load(n, real, optimizer=nopt)
    meta = json.loads((real / "moekit.json").read_text())
    del meta["layers"]
    (real / "moekit.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="not a valid moekit checkpoint.*'layers'"):
        checkpoint.load(n, real, optimizer=nopt)
    (real / "moekit.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="not a valid moekit checkpoint"):
        checkpoint.load(n, real, optimizer=nopt)
    assert _same(before, _state(n))
    after = nopt.state[next(iter(n.parameters()))]
    assert all(torch.equal(after[k], v) for k, v in opt_before.items())


def test_tied_weights(tmp_path):
    torch.manual_seed(0)
    m = nn.ModuleDict({"emb": nn.Embedding(11, 6), "moe": MoE(6, 10, 4), "head": nn.Linear(6, 11, bias=False)})
    m["head"].weight = m["emb"].weight
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    checkpoint.save(m, tmp_path / "ck", optimizer=opt)
    torch.manual_seed(1)
    n = nn.ModuleDict({"emb": nn.Embedding(11, 6), "moe": MoE(6, 10, 4), "head": nn.Linear(6, 11, bias=False)})
    n["head"].weight = n["emb"].weight
    checkpoint.load(n, tmp_path / "ck", optimizer=torch.optim.SGD(n.parameters(), lr=0.1, momentum=0.9))
    assert n["head"].weight is n["emb"].weight
    assert torch.equal(n["emb"].weight, m["emb"].weight)


def _modes(root: Path):
    return {p.name: p.stat().st_mode & 0o777 for p in root.rglob("*") if p.is_file()}


def test_files_honour_the_umask_and_a_replaced_checkpoint_keeps_its_mode(tmp_path):
    m = MoE(6, 10, 4)
    old = os.umask(0o027)
    try:
        checkpoint.save(m, tmp_path / "ck")
    finally:
        os.umask(old)
    modes = _modes((tmp_path / "ck").resolve())
    assert modes and set(modes.values()) == {0o640}, modes
    os.chmod((tmp_path / "ck").resolve(), 0o700)
    checkpoint.save(m, tmp_path / "ck")
    assert (tmp_path / "ck").resolve().stat().st_mode & 0o777 == 0o700


def test_a_killed_save_keeps_the_previous_checkpoint_and_litter_is_removed(tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp
    m = MoE(6, 10, 4)
    checkpoint.save(m, tmp_path / "ck", extra={"step": 1})
    real_save = dcp.save

    def dies_midway(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)            # every shard written, then killed
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(dcp, "save", dies_midway)
    with torch.no_grad():
        m.experts.w_in.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(m, tmp_path / "ck", extra={"step": 2})
    monkeypatch.setattr(dcp, "save", real_save)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".ck.")) == ["ck"]
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]) == 1     # no temporary left
    assert checkpoint.load(MoE(6, 10, 4), tmp_path / "ck") == {"step": 1}
    # what a SIGKILL leaves (a half-written version, a dangling link) is removed by the next save
    (tmp_path / ".ck.deadbeef" / "rng").mkdir(parents=True)
    (tmp_path / ".ck.deadbeef" / "__0_0.distcp").write_bytes(b"\0" * 4096)
    os.symlink(".ck.deadbeef", tmp_path / ".ck.link-0000")
    checkpoint.save(m, tmp_path / "ck", extra={"step": 3})
    assert len([p for p in tmp_path.iterdir() if p.name.startswith(".ck.")]) == 1
    assert checkpoint.load(MoE(6, 10, 4), tmp_path / "ck") == {"step": 3}


@pytest.mark.parametrize("saved,module", [(torch.int32, torch.float32), (torch.float16, torch.float32),
                                          (torch.float32, torch.float64)])
def test_another_dtype_is_refused_naming_the_tensor(tmp_path, saved, module):
    torch.manual_seed(0)
    a = nn.ModuleDict({"moe": MoE(6, 10, 4), "lin": nn.Linear(6, 6)})
    if saved.is_floating_point:
        a["lin"].to(saved)
    else:
        a["lin"].weight = nn.Parameter(a["lin"].weight.detach().to(saved), requires_grad=False)
    checkpoint.save(a, tmp_path / "ck")
    b = nn.ModuleDict({"moe": MoE(6, 10, 4), "lin": nn.Linear(6, 6)}).to(module) if module == torch.float64 else \
        nn.ModuleDict({"moe": MoE(6, 10, 4), "lin": nn.Linear(6, 6)})
    if module == torch.float64:
        b["moe"].float()
    before = _state(b)
    with pytest.raises(ValueError, match=rf"'lin.weight' is {saved} in the file but {module}"):
        checkpoint.load(b, tmp_path / "ck")
    assert _same(before, _state(b))


def test_an_optimizer_over_other_parameters_is_refused(tmp_path):
    m = MoE(6, 10, 4)
    other = MoE(6, 10, 4)
    opt = torch.optim.Adam(other.parameters())
    with pytest.raises(ValueError, match="optimizer: Adam holds a parameter .* not a parameter of module"):
        checkpoint.save(m, tmp_path / "ck", optimizer=opt)
    assert not (tmp_path / "ck").exists() and not list(tmp_path.iterdir())
    checkpoint.save(m, tmp_path / "ck", optimizer=torch.optim.Adam(m.parameters()))
    with pytest.raises(ValueError, match="optimizer: Adam holds a parameter"):
        checkpoint.load(m, tmp_path / "ck", optimizer=opt)


def test_lbfgs_state_is_refused_naming_the_optimizer(tmp_path):
    torch.manual_seed(0)
    m = MoE(6, 10, 4)
    opt = torch.optim.LBFGS(m.parameters(), max_iter=4)
    x = torch.randn(8, 6)

    def closure():
        opt.zero_grad()
        loss = m(x).y.square().mean()
        loss.backward()
        return loss
    opt.step(closure)
    assert opt.state[m.router.gate.weight]["old_dirs"]            # a history of tensors
    with pytest.raises(ValueError, match="optimizer: LBFGS keeps state '(al|old_dirs)' of parameter .* as a list"):
        checkpoint.save(m, tmp_path / "ck", optimizer=opt)
    assert not list(tmp_path.iterdir())


def test_async_save(tmp_path):
    m, opt = _trained()
    pending = checkpoint.async_save(m, tmp_path / "ck", optimizer=opt, extra={"step": 7})
    pending.result()
    n, nopt = _trained(seed=1)
    assert checkpoint.load(n, tmp_path / "ck", optimizer=nopt) == {"step": 7}
    assert _same(_state(m), _state(n))


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(ValueError, match="not a valid moekit checkpoint"):
        checkpoint.load(MoE(6, 10, 4), tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="path:"):
        checkpoint.load(MoE(6, 10, 4), tmp_path / "nothing")
    with pytest.raises(ValueError, match="path: .* exists and is not a moekit checkpoint"):
        checkpoint.save(MoE(6, 10, 4), tmp_path / "plain")
