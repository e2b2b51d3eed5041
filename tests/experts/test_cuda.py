"""CUDA paths (skipped without a GPU): the layer and the grouped matmul agree with the CPU reference."""
import pytest
import torch

from moekit import MoE
from moekit.experts.grouped_mm import grouped_mm, grouped_mm_reference

pytestmark = pytest.mark.gpu
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_cuda_matches_loop(dtype):
    g = torch.Generator().manual_seed(0)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(16, 32, generator=g).to("cuda", dtype).requires_grad_()
    w = torch.randn(4, 32, 48, generator=g).to("cuda", dtype).requires_grad_()
    c = counts.cuda()
    y = grouped_mm(x, w, c)
    gx, gw = torch.autograd.grad(y.float().square().sum(), (x, w))
    x2, w2 = x.detach().float().requires_grad_(), w.detach().float().requires_grad_()
    y2 = grouped_mm_reference(x2, w2, c)
    gx2, gw2 = torch.autograd.grad(y2.square().sum(), (x2, w2))
    tol = dict(rtol=2e-2, atol=2e-1) if dtype == torch.bfloat16 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(y.float(), y2, **tol)
    torch.testing.assert_close(gx.float(), gx2, **tol)
    torch.testing.assert_close(gw.float(), gw2, **tol)


@cuda
def test_layer_cuda_matches_cpu():
    torch.manual_seed(0)
    layer = MoE(32, 64, 8, top_k=2).eval()
    x = torch.randn(50, 32)
    ref = layer(x).y
    out = layer.cuda()(x.cuda()).y.cpu()
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
