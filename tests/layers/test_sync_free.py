"""No host synchronisation on the hot path, checked on the CPU: every aten call of one forward+backward
is watched, and a call that reads a value on the host (``.item()``, ``bool(tensor)``, ``int(tensor)``),
makes a tensor from Python data (``torch.tensor(number)``), or has a data-dependent shape
(``nonzero``, ``masked_select``, ``unique``) fails the test. On CUDA each of these stalls the GPU; the
GPU tests (marker ``gpu``) check the same with ``torch.cuda.set_sync_debug_mode("error")``.

The expert GEMMs are swapped for a sync-free emulation here: the CPU grouped-matmul kernels read
the group sizes on the host by design (there is no device to synchronise with)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import MoE

HOST_READS = {"aten._local_scalar_dense.default", "aten.lift_fresh.default", "aten.lift_fresh_copy.default",
              "aten.nonzero.default", "aten.masked_select.default", "aten._unique2.default",
              "aten.unique_consecutive.default", "aten.unique_dim.default"}


class HostReadDetector(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if str(func) in HOST_READS:
            self.seen.append(str(func))
        return func(*args, **(kwargs or {}))


def _emulated_grouped_mm(x_RD, w_EDH, counts_E, *, fuse_grad_accumulation=False):
    """``y[rows of e] = x[rows of e] @ w[e]`` without reading the group sizes on the host."""
    R, E = x_RD.shape[0], w_EDH.shape[0]
    group_R = torch.bucketize(torch.arange(R), torch.cumsum(counts_E, 0), right=True)
    y_RH = torch.bmm(x_RD[:, None, :], w_EDH[group_R.clamp_max(E - 1)])[:, 0]
    return torch.where((group_R < E)[:, None], y_RH, torch.zeros_like(y_RH))


CASES = [
    ("topk", {}), ("switch", {}), ("noisy_topk", {}), ("vmoe", {}), ("scored", {}),
    ("sigmoid", dict(num_shared_experts=1)),
    ("topk", dict(capacity_factor=1.0)), ("vmoe", dict(capacity_factor=1.0, batch_priority=True)),
    ("switch", dict(capacity=3, group_size="sequence")), ("topk", dict(group_size=5, capacity_factor=1.0)),
    ("soft", {}), ("expert_choice", {}),
]


@pytest.mark.parametrize("router, kw", CASES)
@pytest.mark.parametrize("masked", [False, True])
def test_forward_backward_reads_nothing_on_the_host(monkeypatch, router, kw, masked):
    if masked and router == "expert_choice":
        pytest.skip("expert choice with a mask reads the number of real tokens on the host (documented)")
    import moekit.experts.bank as bank
    monkeypatch.setattr(bank, "grouped_mm", _emulated_grouped_mm)
    torch.manual_seed(0)
    layer = MoE(8, 16, 4, router=router, w_z=1e-3, **kw).train()
    x = torch.randn(2, 7, 8, requires_grad=True)
    mask = torch.arange(7)[None, :] < torch.tensor([[7], [4]]) if masked else None
    layer(x, mask=mask)                                   # first call outside the check (lazy set-up)
    detector = HostReadDetector()
    with detector:
        out = layer(x, mask=mask)
        (out.y.square().sum() + out.aux_loss).backward()
        torch.stack([v.float().sum() for v in out.metrics.values()])
    assert detector.seen == [], detector.seen


def test_the_detector_sees_a_host_read():
    detector = HostReadDetector()
    with detector:
        t = torch.ones(3)
        bool(t.sum() > 0)
        torch.tensor(2.0)
    assert "aten._local_scalar_dense.default" in detector.seen and "aten.lift_fresh.default" in detector.seen
