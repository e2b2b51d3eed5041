"""DCP checkpoints across layouts: saved at EP 2 × FSDP2 dp 2 on 4 processes, reloaded at EP 2 on 2, in
one process without torch.distributed, and at EP 4 × FSDP2 on 4 — every model and optimizer tensor
bit-identical after each hop, the outputs equal."""
import json
from pathlib import Path

import pytest
import torch

from moekit import checkpoint
from parallel.launcher import launch

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "ep_worker.py"
HERE = Path(__file__).parent


def _worker_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("ep_worker", WORKER)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _everything(ckpt, w):
    """Model and optimizer state of a checkpoint, loaded in this (non-distributed) process."""
    m = w.ck_model(0)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    extra = checkpoint.load(m, ckpt, optimizer=opt, restore_rng=False)
    state = {f"model/{k}": v.clone() for k, v in m.state_dict().items()}
    names = {id(p): n for n, p in m.named_parameters()}
    for p, entry in opt.state.items():
        for k, v in entry.items():
            state[f"optim/{names[id(p)]}/{k}"] = v.clone()
    return m, opt, state, extra


def test_checkpoint_reshards_4_2_1_4(tmp_path):
    w = _worker_module()
    ck4 = tmp_path / "ck4"
    launch(4, WORKER, "save", "dp2-ep2-fsdp", ck4)
    _, _, reference, extra = _everything(ck4, w)
    assert extra == {"step": 1, "layout": "dp2-ep2-fsdp"}
    assert any(k.startswith("optim/moe.experts.w_in/exp_avg") for k in reference)
    assert reference["model/moe.router.expert_bias"].abs().sum() > 0
    out2 = tmp_path / "out2"
    out2.mkdir()
    launch(2, WORKER, "reload", "ep2", ck4, out2)
    # one process, no torch.distributed
    m1, opt1, state2, _ = _everything(out2 / "ck", w)
    X = w.global_batch(1, seed=6)[0].float()
    with torch.no_grad():
        y1 = w.ck_run(m1, X)
    for r in range(2):
        torch.testing.assert_close(torch.tensor(json.loads((out2 / f"rank{r}.json").read_text())["y"]), y1,
                                   rtol=1e-6, atol=1e-6)
    ck1 = tmp_path / "ck1"
    checkpoint.save(m1, ck1, optimizer=opt1, extra={"step": 1})
    out4 = tmp_path / "out4"
    out4.mkdir()
    launch(4, WORKER, "reload", "ep4-fsdp", ck1, out4)
    for r in range(4):
        torch.testing.assert_close(torch.tensor(json.loads((out4 / f"rank{r}.json").read_text())["y"]), y1,
                                   rtol=1e-6, atol=1e-6)
    for ck in (out2 / "ck", ck1, out4 / "ck"):
        state = _everything(ck, w)[2]
        assert state.keys() == reference.keys()
        for k, v in reference.items():
            assert torch.equal(state[k], v), (ck.name, k)


def test_async_save_while_training(tmp_path):
    # the save's background thread coordinates on its own group while the ranks train on
    launch(2, WORKER, "async", tmp_path / "ck")
