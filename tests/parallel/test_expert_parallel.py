"""Expert parallelism on gloo/CPU: EP (and EP×DP) == one process, resharding checkpoints, kill-and-resume.

Each multi-process check launches N worker processes (``ep_worker.py`` or the training example) the
way torchrun does (RANK / WORLD_SIZE / MASTER_* in the environment) and reads what they wrote.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moekit import MoE, checkpoint

pytest.importorskip("safetensors")
HERE = Path(__file__).parent
ROOT = HERE.parents[1]
WORKER = HERE / "ep_worker.py"
EXAMPLE = ROOT / "examples" / "train_expert_parallel.py"


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(nproc: int, script: Path, *args, wait: bool = True, timeout: float = 240):
    """Start ``nproc`` ranks of ``script`` in one new process group; wait for them (or return the Popens)."""
    env_base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_port()), WORLD_SIZE=str(nproc),
                    OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs, pgid = [], None
    for rank in range(nproc):
        env = dict(env_base, RANK=str(rank), LOCAL_RANK=str(rank))
        p = subprocess.Popen([sys.executable, str(script), *map(str, args)], env=env, cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             process_group=0 if pgid is None else pgid)     # one process group: killable together
        pgid = pgid or p.pid
        procs.append(p)
    if not wait:
        return procs, pgid
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    failed = [f"rank {r} (exit {p.returncode}):\n{out[-3000:]}" for r, (p, out) in enumerate(zip(procs, outs))
              if p.returncode != 0]
    assert not failed, "\n".join(failed)
    return outs


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(tmp_path, world):
    # fp64: outputs, input gradients, router/expert/shared gradients, aux loss and the sigmoid bias update
    # for dropless top-k, sigmoid + shared expert, capacity-limited switch; at W=4 also dp=2 × ep=2.
    launch(world, WORKER, "equivalence", tmp_path)
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        meshes = ["ep"] + (["dp2xep2"] if world == 4 else [])
        for mesh in meshes:
            for name in ("topk", "sigmoid_shared", "switch_capacity"):
                errs = res[f"{mesh}/{name}"]
                assert max(errs.values()) <= 1e-6, (mesh, name, errs)
                assert any(k.startswith("grad experts.") for k in errs)
        assert "do not split" in res["indivisible"] and str(world) in res["indivisible"]


def _plain_model(seed):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 6), MoE(6, 10, 8, router="topk", top_k=2, expert="glu"))


def test_checkpoint_reshards_4_2_1_4(tmp_path):
    ck4 = tmp_path / "ep4.safetensors"
    launch(4, WORKER, "save", 7, ck4)
    out2 = tmp_path / "out2"
    out2.mkdir()
    launch(2, WORKER, "reload", ck4, out2)
    y2 = [json.loads((out2 / f"rank{r}.json").read_text()) for r in range(2)]
    assert y2[0]["extra"] == {"step": 1, "world": 4}
    # EP=1: a plain process, no torch.distributed at all
    m = _plain_model(99)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    checkpoint.load(m, out2 / "resaved.safetensors", optimizer=opt)
    g = torch.Generator().manual_seed(6)
    X = torch.randn(12, 6, generator=g, dtype=torch.float64).float()      # the workers' global_batch(1, 6)
    with torch.no_grad():
        y1 = m[1](m[0](X)).y
    # the same weights; float32 GEMMs over other row groupings round differently in the last bits
    for r in range(2):
        torch.testing.assert_close(torch.tensor(y2[r]["y"]), y1, rtol=1e-6, atol=1e-6)
    ck1 = tmp_path / "ep1.safetensors"
    checkpoint.save(m, ck1, optimizer=opt, extra={"step": 1})
    out4 = tmp_path / "out4"
    out4.mkdir()
    launch(4, WORKER, "reload", ck1, out4)
    for r in range(4):
        torch.testing.assert_close(torch.tensor(json.loads((out4 / f"rank{r}.json").read_text())["y"]), y1,
                                   rtol=1e-6, atol=1e-6)
    # model and optimizer tensors survive 4 -> 2 -> 1 -> 4 unchanged
    from safetensors.torch import load_file
    a, b = load_file(str(ck4)), load_file(str(out4 / "resaved.safetensors"))
    keys = [k for k in a if not k.startswith("rng/")]
    assert any(k.startswith("optim/1.experts.w_in/") for k in keys)
    for k in keys:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=0, msg=k)


def test_kill_and_resume_is_bit_identical(tmp_path):
    args = ["--steps", "24", "--ckpt-every", "4", "--experts", "4"]
    full = tmp_path / "full"
    launch(2, EXAMPLE, "--ckpt", full / "ck.safetensors", *args)
    expected = (full / "ck.losses.jsonl").read_text()
    assert len(expected.splitlines()) == 24

    run = tmp_path / "killed"
    log = run / "ck.losses.jsonl"
    procs, pgid = launch(2, EXAMPLE, "--ckpt", run / "ck.safetensors", *args, wait=False)
    deadline = time.time() + 180
    while time.time() < deadline:            # kill mid-run, between checkpoints
        if log.exists() and len(log.read_text().splitlines()) >= 10:
            break
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    for p in procs:
        p.communicate()
    killed_at = len(log.read_text().splitlines())
    assert 10 <= killed_at < 24, f"killed after {killed_at} steps"
    assert (run / "ck.safetensors").exists()
    launch(2, EXAMPLE, "--ckpt", run / "ck.safetensors", *args)      # the same command again
    assert log.read_text() == expected


def test_mismatched_routing_config_is_refused(tmp_path):
    torch.manual_seed(0)
    a = MoE(6, 10, 4, top_k=2)
    checkpoint.save(a, tmp_path / "a.safetensors")
    for kw, field in ((dict(top_k=1), "top_k"), (dict(top_k=2, capacity_factor=1.0), "capacity_factor"),
                      (dict(top_k=2, router_options={"renormalize": False}), "router.renormalize"),
                      (dict(top_k=2, router="sigmoid"), "router")):
        b = MoE(6, 10, 4, **kw)
        with pytest.raises(ValueError, match=field):
            checkpoint.load(b, tmp_path / "a.safetensors")
    c = MoE(6, 10, 4, top_k=2)
    checkpoint.load(c, tmp_path / "a.safetensors")
    x = torch.randn(5, 6)
    torch.testing.assert_close(c(x).y, a(x).y, rtol=0, atol=0)


def test_a_failed_save_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    import safetensors.torch as st
    torch.manual_seed(0)
    m = MoE(6, 10, 4)
    path = tmp_path / "ck.safetensors"
    checkpoint.save(m, path, extra={"step": 1})
    before = path.read_bytes()
    real = st.save_file

    def dies_midway(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise KeyboardInterrupt("killed while writing")
    monkeypatch.setattr(st, "save_file", dies_midway)
    with torch.no_grad():
        m.experts.w_in.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(m, path, extra={"step": 2})
    monkeypatch.setattr(st, "save_file", real)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck.safetensors"]      # no temporary left behind
    assert checkpoint.load(MoE(6, 10, 4), path) == {"step": 1}
    assert oct(path.stat().st_mode & 0o777) == "0o644"
