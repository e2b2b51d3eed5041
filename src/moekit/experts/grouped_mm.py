"""Grouped matrix multiply for expert banks: rows of ``x`` sorted by expert, one weight per expert.

Legend (the package's, ``moekit/__init__.py``): R rows handed to the experts (sorted by expert), E experts,
D input features, O output features, C capacity (here the largest group's row count: the padded buffer's
rows per expert).

``grouped_mm(x_RD, w_EDO, counts_E) -> y_RO`` with ``y[rows of e] = x[rows of e] @ w[e]``.
Kernels:
  * ``torch.nn.functional.grouped_mm`` where it is supported: on CPU float32/bf16/fp16, on GPU bf16
    with compute capability >= 8.0; 16-byte aligned operands;
  * otherwise on CPU one GEMM per non-empty group written in place (no padding: routing can be very
    uneven; the group sizes are read on the host, with no device to synchronise with). It runs within
    ~10 % of torch's CPU kernel both ways (``benchmarks/grouped_mm_kernels.py``), takes any dtype and
    alignment, and is the kernel that adds into an existing gradient (the fusion below);
  * otherwise on GPU a loop-free padded ``bmm`` (rows scattered into an (E, C, D) buffer, C the largest
    group size, read on the host).
Autograd is ours (registered on the ``moekit::grouped_mm`` custom operator): the backward makes the incoming gradient dense and
contiguous (torch's own grouped_mm backward fails on expanded gradients) and reuses the same kernels:
``dx = dy @ w[e]^T`` per group, ``dw[e] = x[rows of e]^T dy[rows of e]``.

Gradient-accumulation fusion (``grouped_mm(..., fuse_grad_accumulation=True)``, Megatron-LM's
``gradient_accumulation_fusion`` for expert banks): when ``w`` is a leaf parameter whose ``.grad``
already exists, the backward adds ``x^T dy`` into ``w.grad`` with the GEMM itself (``addmm`` in place)
and hands autograd no gradient for ``w``. Without it, every backward writes a fresh weight-sized
gradient (hundreds of MB for a large bank, each page faulted in on first write) and autograd then adds
it into the kept ``.grad``. The price is autograd's bookkeeping for ``w``: its gradient hooks do not run
and ``torch.autograd.grad`` cannot be taken with respect to it. A missing ``.grad`` is created by the
backward as usual.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_CPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(t: Tensor) -> bool:
    """grouped_mm needs 16-byte aligned base pointers and leading strides. Under ``torch.compile`` the
    base pointer is not known while tracing; the compiler's buffers are aligned (a misaligned view
    would make the kernel raise, not compute wrong values)."""
    es = t.element_size()
    strides_ok = all((s * es) % 16 == 0 for s, n in zip(t.stride(), t.shape) if s != 1)
    if torch.compiler.is_compiling():
        return strides_ok
    return t.data_ptr() % 16 == 0 and strides_ok


def native_supported(*tensors: Tensor) -> bool:
    """Whether torch's grouped_mm kernel can take these operands."""
    t0 = tensors[0]
    if not hasattr(F, "grouped_mm"):
        return False
    if t0.device.type == "cpu":
        ok_dtype = t0.dtype in _CPU_DTYPES
    elif t0.device.type == "cuda":
        ok_dtype = t0.dtype == torch.bfloat16 and torch.cuda.get_device_capability(t0.device)[0] >= 8
    else:
        ok_dtype = False
    return ok_dtype and all(t.dtype == t0.dtype and _aligned(t) for t in tensors)


def _offsets(counts_E: Tensor) -> Tensor:
    return torch.cumsum(counts_E, 0).to(torch.int32)


def _group_positions(counts_E: Tensor, num_rows: int) -> tuple[Tensor, Tensor, int]:
    """For rows sorted by group: (group id of each row, position inside its group, max group size).
    Rows past ``counts_E.sum()`` (padding) get group id E and position 0."""
    E = counts_E.shape[0]
    ends_E = torch.cumsum(counts_E, 0)
    rows_R = torch.arange(num_rows, device=counts_E.device)
    group_R = torch.bucketize(rows_R, ends_E, right=True)                    # in [0, E]
    starts_E1 = torch.cat([ends_E - counts_E, ends_E.new_zeros(1)])
    pos_R = torch.where(group_R < E, rows_R - starts_E1[group_R], torch.zeros_like(rows_R))
    max_count = int(counts_E.max()) if E > 0 and num_rows > 0 else 0        # host read: fallback path only
    return group_R, pos_R, max(max_count, 1)


def _pad(x_RD: Tensor, group_R: Tensor, pos_R: Tensor, E: int, C: int) -> Tensor:
    """(E, C, D) buffer (C = the largest group's row count) holding each group's rows (zeros past its
    count); padding rows are left out."""
    out_ECD = x_RD.new_zeros(E + 1, C, x_RD.shape[-1])
    out_ECD[group_R, pos_R] = x_RD
    return out_ECD[:E]


def _mm_kernel(x_RD: Tensor, w_EDO: Tensor, counts_E: Tensor) -> Tensor:
    """y[rows of e] = x[rows of e] @ w[e] (no autograd). Rows past ``counts_E.sum()`` are not computed:
    the native kernel leaves them undefined, the fallback zero."""
    if x_RD.shape[0] == 0:
        return x_RD.new_zeros(0, w_EDO.shape[-1])
    if native_supported(x_RD, w_EDO):
        return F.grouped_mm(x_RD, w_EDO, offs=_offsets(counts_E))
    if x_RD.device.type == "cpu":          # one GEMM per non-empty group, written in place: no padding
        y_RO = x_RD.new_empty(x_RD.shape[0], w_EDO.shape[-1])
        start = 0
        for e, c in enumerate(counts_E.tolist()):
            if c:
                torch.mm(x_RD[start:start + c], w_EDO[e], out=y_RO[start:start + c])
            start += c
        y_RO[start:] = 0                   # padding rows
        return y_RO
    E = w_EDO.shape[0]
    group_R, pos_R, C = _group_positions(counts_E, x_RD.shape[0])
    y_ECO = torch.bmm(_pad(x_RD, group_R, pos_R, E, C), w_EDO)
    y_ECO = torch.cat([y_ECO, y_ECO.new_zeros(1, C, y_ECO.shape[-1])])     # padding rows read zeros
    return y_ECO[group_R, pos_R]


def _cpu_wgrad_loop(x_RD: Tensor, dy_RO: Tensor, counts_E: Tensor, dw_EDO: Tensor, *, accumulate: bool) -> Tensor:
    """One GEMM per group into ``dw_EDO``: ``dw[e] = x[rows of e]^T dy[rows of e]``, or ``+=`` with
    ``accumulate`` (the GEMM adds into the gradient: no temporary, one pass). Padding rows are left out."""
    xt_DR = x_RD.t()
    start = 0
    for e, c in enumerate(counts_E.tolist()):
        if c and accumulate:
            dw_EDO[e].addmm_(xt_DR[:, start:start + c], dy_RO[start:start + c])
        elif c:
            torch.mm(xt_DR[:, start:start + c], dy_RO[start:start + c], out=dw_EDO[e])
        elif not accumulate:
            dw_EDO[e].zero_()              # an expert with no rows has a zero gradient
        start += c
    return dw_EDO


def _wgrad_kernel(x_RD: Tensor, dy_RO: Tensor, counts_E: Tensor) -> Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e] (no autograd); padding rows are left out."""
    E = counts_E.shape[0]
    if x_RD.shape[0] > 0 and native_supported(x_RD, dy_RO):
        return F.grouped_mm(x_RD.t(), dy_RO, offs=_offsets(counts_E))
    if x_RD.device.type == "cpu":
        return _cpu_wgrad_loop(x_RD, dy_RO, counts_E, x_RD.new_empty(E, x_RD.shape[-1], dy_RO.shape[-1]),
                               accumulate=False)
    group_R, pos_R, C = _group_positions(counts_E, x_RD.shape[0])
    return torch.bmm(_pad(x_RD, group_R, pos_R, E, C).transpose(1, 2), _pad(dy_RO, group_R, pos_R, E, C))


# The kernels are registered as custom operators with their own shape functions, so ``torch.compile``
# traces a grouped matmul as one opaque node (torch's own meta function for ``_grouped_mm`` accepts
# bf16 only) and the dynamic per-expert sizes never reach the graph.
@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm_op(x_RD: Tensor, w_EDO: Tensor, counts_E: Tensor, fuse_grad_accumulation: bool = False) -> Tensor:
    return _mm_kernel(x_RD.contiguous(), w_EDO, counts_E)


@_grouped_mm_op.register_fake
def _(x_RD: Tensor, w_EDO: Tensor, counts_E: Tensor, fuse_grad_accumulation: bool = False) -> Tensor:
    return x_RD.new_empty(x_RD.shape[0], w_EDO.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x_RD: Tensor, dy_RO: Tensor, counts_E: Tensor) -> Tensor:
    return _wgrad_kernel(x_RD.contiguous(), dy_RO.contiguous(), counts_E)


@_grouped_mm_wgrad_op.register_fake
def _(x_RD: Tensor, dy_RO: Tensor, counts_E: Tensor) -> Tensor:
    return x_RD.new_empty(counts_E.shape[0], x_RD.shape[-1], dy_RO.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_wgrad_accumulate", mutates_args=("dw_EDO",))
def _grouped_mm_wgrad_accumulate_op(x_RD: Tensor, dy_RO: Tensor, counts_E: Tensor, dw_EDO: Tensor) -> None:
    """dw[e] += x[rows of e]^T @ dy[rows of e], in place."""
    x_RD, dy_RO = x_RD.contiguous(), dy_RO.contiguous()
    if x_RD.device.type != "cpu":
        dw_EDO.add_(_wgrad_kernel(x_RD, dy_RO, counts_E).to(dw_EDO.dtype))
        return
    _cpu_wgrad_loop(x_RD, dy_RO, counts_E, dw_EDO, accumulate=True)


def _fusable(w: Tensor, x_RD: Tensor) -> bool:
    """Whether the backward may add straight into ``w.grad``: a leaf whose gradient exists, matches it
    and would otherwise only be accumulated (eager mode; under ``torch.compile`` autograd does it)."""
    if torch.compiler.is_compiling() or not (w.is_leaf and w.requires_grad):
        return False
    g = w.grad
    return (g is not None and g.shape == w.shape and g.dtype == w.dtype == x_RD.dtype and g.device == w.device
            and g.layout == torch.strided and g.is_contiguous())


def _setup_context(ctx, inputs, output):
    x_RD, w_EDO, counts_E, fuse = inputs
    ctx.save_for_backward(x_RD, w_EDO, counts_E)
    ctx.fuse_target = w_EDO if fuse else None     # the parameter itself: its .grad is read at backward time


def _backward(ctx, dy_RO: Tensor):
    x_RD, w_EDO, counts_E = ctx.saved_tensors
    dy_RO = dy_RO.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_mm_op(dy_RO, w_EDO.transpose(1, 2), counts_E)
    if ctx.needs_input_grad[1]:
        target = ctx.fuse_target
        if target is not None and _fusable(target, x_RD):
            _grouped_mm_wgrad_accumulate_op(x_RD, dy_RO, counts_E, target.grad)
        else:
            dw = _grouped_mm_wgrad_op(x_RD, dy_RO, counts_E).to(w_EDO.dtype)
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_RD: Tensor, w_EDO: Tensor, counts_E: Tensor, *, fuse_grad_accumulation: bool = False) -> Tensor:
    """Differentiable grouped matmul. ``counts_E`` (int64, sum = R) gives each expert's row count.

    ``fuse_grad_accumulation``: when ``w_EDO`` is a parameter whose ``.grad`` exists, the backward adds
    its gradient into ``.grad`` directly (no temporary; autograd hooks on ``w_EDO`` do not run). See the
    module docstring."""
    if x_RD.dim() != 2 or w_EDO.dim() != 3 or x_RD.shape[1] != w_EDO.shape[1]:
        raise ValueError(f"grouped_mm: expected x (R, D) and w (E, D, O), got {tuple(x_RD.shape)} and "
                         f"{tuple(w_EDO.shape)}")
    if counts_E.shape != (w_EDO.shape[0],):
        raise ValueError(f"counts: expected shape ({w_EDO.shape[0]},), got {tuple(counts_E.shape)}")
    if not isinstance(fuse_grad_accumulation, bool):
        raise TypeError(f"fuse_grad_accumulation: must be a bool, got {fuse_grad_accumulation!r}")
    return _grouped_mm_op(x_RD, w_EDO, counts_E, fuse_grad_accumulation)


def grouped_mm_reference(x_RD: Tensor, w_EDO: Tensor, counts_E: Tensor) -> Tensor:
    """Obviously-right per-expert loop; tests use it as the oracle (padding rows: zeros)."""
    sizes = counts_E.tolist()
    chunks = torch.split(x_RD, sizes + [x_RD.shape[0] - sum(sizes)], dim=0)
    out = [c @ w_EDO[e] for e, c in enumerate(chunks[:-1])]
    return torch.cat(out + [x_RD.new_zeros(chunks[-1].shape[0], w_EDO.shape[-1])], dim=0)
