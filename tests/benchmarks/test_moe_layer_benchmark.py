"""benchmarks/moe_layer.py: the GPU suite and the profiler mode run their code on CPU at toy sizes, the
CPU table keeps its layout, and the TFLOP/s the suite reports count the dense limit's FLOPs exactly.
No timing is asserted.
"""
import importlib.util
import os
import re
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("moe_layer_benchmark", ROOT / "benchmarks" / "moe_layer.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _peer_in(out: str) -> bool:
    """Whether the run timed transformers' block (installed, version >= 5 and runnable), as it says."""
    return "its columns are left out" not in out and "transformers" in out and "none (transformers" not in out


def test_expert_flops_count_the_dense_limit(bench):
    T, K, D, H = 24, 2, 16, 40
    x = torch.randn(T * K, D, requires_grad=True)
    w1 = torch.randn(D, 2 * H, requires_grad=True)
    w2 = torch.randn(H, D, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        bench.dense_step(x, w1, w2, "glu")
    assert counter.get_total_flops() == bench.expert_flops(T, K, D, H)


@pytest.mark.slow             # compiles the layer (aot_eager) for each toy configuration
def test_gpu_suite_table_at_toy_sizes_on_cpu(bench, capsys):
    bench.main(["--gpu-suite", "--device", "cpu", "--tiny", "--repeats", "1", "--compile-backend", "aot_eager"])
    out = capsys.readouterr().out
    assert "dtype=bfloat16" in out and "backend='aot_eager'" in out
    rows = [line for line in out.splitlines() if re.match(r"\s+\d+ \(\d+, \d+\) \d+ \d+ ", line)]
    # one timing row and one memory row per configuration
    assert len(rows) == 2 * len(bench.TINY_SUITE)
    peer = _peer_in(out) and "peer = transformers MixtralSparseMoeBlock" in out
    for line in rows[:len(bench.TINY_SUITE)]:
        cells = line.split()[5:]                   # after the label "E (D, H) k T"
        # dense ms, TF/s, then ratio and TF/s of eager, compiled, transformers, then m/p and mc/p
        assert len(cells) == 2 + 3 * 2 + 2
        numbers = [float(c) for c in cells if c != "-"]
        assert len(numbers) == (len(cells) if peer else len(cells) - 4)
        assert all(v >= 0 for v in numbers) and float(cells[0]) > 0
    assert "peak memory of one forward+backward" in out


def test_profile_mode_prints_the_top_entries_on_cpu(bench, capsys):
    bench.main(["--profile", "--tokens", "64", "--configs", "4:16:32", "--profile-steps", "2", "--profile-top", "5",
                "--threads", "1"])
    out = capsys.readouterr().out
    blocks = out.split("== profile ")[1:]
    assert len(blocks) == (2 if _peer_in(out) else 1)
    assert blocks[0].startswith("moekit: E=4 D=16 H=32 T=64 k=2 float32 on cpu") and "self CPU time" in blocks[0]
    lines = [line for line in blocks[0].splitlines()[2:] if line.strip()]
    assert 1 <= len(lines) <= 5
    assert any("mm" in line for line in lines)             # the expert GEMMs show up


def test_cpu_table_layout_is_unchanged(bench, capsys):
    bench.main(["--tokens", "32", "--configs", "4:16:32", "--repeats", "1", "--threads", "1", "--no-peer"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("forward+backward, time / dense-limit time (median of 1 interleaved rounds), "
                               "device=cpu dtype=float32 T=32 k=2 expert=glu")
    assert lines[2].split() == ["E", "(D,", "H)", "dense", "ms", "1t", "moekit", "1t"]
    assert re.fullmatch(r"\s+4 \(16, 32\)\s+\d+\s+\d+\.\d\d", lines[4])


def test_bad_flag_combinations(bench):
    with pytest.raises(SystemExit, match="--tiny"):
        bench.main(["--tiny"])
    with pytest.raises(SystemExit, match="one at a time"):
        bench.main(["--gpu-suite", "--profile", "--device", "cpu"])
    with pytest.raises(SystemExit, match="--profile-steps"):
        bench.main(["--profile", "--profile-steps", "0"])


@pytest.mark.slow
def test_gpu_check_script_runs_its_benchmark_parts_on_cpu(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), DEVICE="cpu", PYTHON=os.environ.get("PYTHON", "python"))
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "suite", "profile"], env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert {p.name for p in tmp_path.iterdir()} == {"environment.txt", "suite.txt", "profile.txt"}
    assert "GPU suite" in (tmp_path / "suite.txt").read_text()
    assert "== profile moekit" in (tmp_path / "profile.txt").read_text()
    bad = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "nonsense"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown part" in bad.stderr
