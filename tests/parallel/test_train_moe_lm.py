"""The end-to-end workflow of examples/train_moe_lm.py on CPU processes: a patched transformers
Qwen3-MoE trained with EP × FSDP2, killed with SIGKILL and resumed bit-identically, exported with
moekit.hf.save_pretrained and reloaded by plain transformers with equal logits."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch

from parallel.launcher import ROOT, launch

pytestmark = pytest.mark.dist
pytest.importorskip("transformers")
EXAMPLE = ROOT / "examples" / "train_moe_lm.py"


def _check_export(out: Path):
    from transformers import Qwen3MoeForCausalLM
    probe = json.loads((out / "probe.json").read_text())
    model, info = Qwen3MoeForCausalLM.from_pretrained(out / "hf", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(probe["input_ids"])).logits
    torch.testing.assert_close(logits, torch.tensor(probe["logits"]), rtol=1e-4, atol=1e-4)


def test_kill_resume_bit_identical_and_export(tmp_path):
    args = ["--steps", "12", "--ckpt-every", "3", "--ep", "2"]
    full = tmp_path / "full"
    launch(2, EXAMPLE, "--out", full, *args)
    expected = (full / "losses.jsonl").read_text()
    assert len(expected.splitlines()) == 12
    _check_export(full)
    assert (full / "routing").is_dir()

    run = tmp_path / "killed"
    log = run / "losses.jsonl"
    procs, pgid = launch(2, EXAMPLE, "--out", run, *args, wait=False)
    deadline = time.time() + 240
    while time.time() < deadline:            # kill mid-run, between checkpoints
        if log.exists() and len(log.read_text().splitlines()) >= 5:
            break
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    os.killpg(pgid, signal.SIGKILL)
    for p in procs:
        p.communicate()
    killed_at = len(log.read_text().splitlines())
    assert 5 <= killed_at < 12, f"killed after {killed_at} steps"
    launch(2, EXAMPLE, "--out", run, *args)      # the same command again
    assert log.read_text() == expected


def test_dp2_ep2_fsdp_on_four_processes(tmp_path):
    launch(4, EXAMPLE, "--out", tmp_path, "--steps", "4", "--ckpt-every", "2", "--ep", "2")
    assert len((tmp_path / "losses.jsonl").read_text().splitlines()) == 4
    _check_export(tmp_path)
