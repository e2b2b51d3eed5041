"""Expert parallelism on gloo/CPU against one process (float64): EP over a 1-D mesh, dp × ep and a
sub-mesh; bad input; and the parallel-configuration invariance matrix (EP × FSDP2/DDP × gradient
accumulation × capacity drops × experts without tokens × activation checkpointing): loss, every
gradient, the global gradient norm, the clipped update and the bias update equal one process.
"""
import json
from pathlib import Path

import pytest

from parallel.launcher import launch

pytestmark = pytest.mark.dist
WORKER = Path(__file__).parent / "ep_worker.py"


@pytest.mark.parametrize("world", [2, 4])
def test_expert_parallel_equals_one_process(tmp_path, world):
    launch(world, WORKER, "equivalence", tmp_path)
    meshes = ["ep"] + (["dp2xep2", "submesh"] if world == 4 else [])
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for mesh in meshes:
            for name in ("topk", "sigmoid_shared", "scored_bias", "switch_capacity"):
                errs = res[f"{mesh}/{name}"]
                assert max(errs.values()) <= 1e-9, (mesh, name, errs)
                assert any(k.startswith("grad experts.") for k in errs)
                if name in ("sigmoid_shared", "scored_bias"):        # both selection-bias routers synced
                    assert "bias" in errs, (mesh, name)


def test_bad_input_names_the_argument(tmp_path):
    launch(2, WORKER, "errors", tmp_path)
    res = json.loads((tmp_path / "rank0.json").read_text())
    assert res["no_ep_dim"].startswith("ValueError: ep_dim:") and "'dp'" in res["no_ep_dim"]
    assert res["indivisible"].startswith("ValueError: num_experts:") and "3 experts" in res["indivisible"]
    assert res["differ"].startswith("ValueError: module:") and "differ" in res["differ"]
    assert res["twice"].startswith("ValueError: module:")
    assert res["wrapped"].startswith("ValueError: module:") and "DistributedDataParallel" in res["wrapped"]
    assert res["indivisible_untouched"].startswith("ValueError: num_experts:")
    assert res["untouched"] is True            # nothing changed before the error
    assert res["plain_ddp"] == res["plain_fsdp"] == "RuntimeError" and res["shard_kept"] is True


MATRIX = [  # (world, spec)
    (2, dict(ep=2, router="sigmoid", fsdp=True, micro=2, empty=True, checkpointing=True)),
    (2, dict(ep=2, router="capacity")),
    (4, dict(ep=4, router="capacity", fsdp=True, checkpointing=True)),
    (4, dict(ep=2, router="sigmoid", fsdp=True, micro=2, empty=True)),
    (4, dict(ep=1, router="sigmoid", fsdp=True, micro=2, checkpointing=True)),
    (4, dict(ep=2, router="capacity", micro=2, checkpointing=True)),
    (4, dict(ep=2, router="sigmoid", ddp=True, micro=2, empty=True)),
    (4, dict(ep=4, router="sigmoid", ddp=True)),
    (4, dict(ep=2, router="sigmoid", fsdp=True, dp2d=True)),
]


@pytest.mark.parametrize("world,spec", MATRIX, ids=[f"w{w}-" + "-".join(f"{k}{v}" for k, v in s.items())
                                                   for w, s in MATRIX])
def test_parallel_configuration_invariance(tmp_path, world, spec):
    spec = dict(spec, max_norm=0.5)
    launch(world, WORKER, "invariance", tmp_path, json.dumps(spec))
    for rank in range(world):
        res = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert res.pop("clipped") is True          # the clip is active: the update depends on the norm
        assert max(res.values()) <= 1e-9, res
        assert {"loss", "norm"} <= set(res) and any(k.startswith("grad moe.experts.") for k in res)
        assert any(k.startswith("param moe.router.") for k in res)
        if spec["router"] == "sigmoid":
            assert "bias" in res and any(k.startswith("grad moe.shared.") for k in res)
            assert "grad moe.experts.b_in" in res and "grad moe.experts.b_out" in res
