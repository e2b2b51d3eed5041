"""Grouped matrix multiply for expert banks: rows of ``x`` sorted by expert, one weight per expert.

Legend: A rows (token-expert assignments, sorted by expert), E experts, D in features, H out features.

``grouped_mm(x_AD, w_EDH, counts_E) -> y_AH`` with ``y[rows of e] = x[rows of e] @ w[e]``.
Kernels:
  * ``torch.nn.functional.grouped_mm`` where it is supported: on CPU float32/bf16/fp16, on GPU bf16
    with compute capability >= 8.0; 16-byte aligned operands;
  * otherwise on CPU one GEMM per non-empty group written in place (no padding: routing can be very
    uneven; the group sizes are read on the host, with no device to synchronise with). It runs within
    ~10 % of torch's CPU kernel both ways (``benchmarks/grouped_mm_kernels.py``), takes any dtype and
    alignment, and is the kernel that adds into an existing gradient (the fusion below);
  * otherwise on GPU a loop-free padded ``bmm`` (rows scattered into an (E, max_count, D) buffer; reads
    the largest group size on the host).
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


def _pad(x_AD: Tensor, group_A: Tensor, pos_A: Tensor, E: int, M: int) -> Tensor:
    """(E, M, D) buffer holding each group's rows (zeros past its count); padding rows are left out."""
    out_EMD = x_AD.new_zeros(E + 1, M, x_AD.shape[-1])
    out_EMD[group_A, pos_A] = x_AD
    return out_EMD[:E]


def _mm_kernel(x_AD: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """y[rows of e] = x[rows of e] @ w[e] (no autograd). Rows past ``counts_E.sum()`` are not computed:
    the native kernel leaves them undefined, the fallback zero."""
    if x_AD.shape[0] == 0:
        return x_AD.new_zeros(0, w_EDH.shape[-1])
    if native_supported(x_AD, w_EDH):
        return F.grouped_mm(x_AD, w_EDH, offs=_offsets(counts_E))
    if x_AD.device.type == "cpu":          # one GEMM per non-empty group, written in place: no padding
        y_AH = x_AD.new_empty(x_AD.shape[0], w_EDH.shape[-1])
        start = 0
        for e, c in enumerate(counts_E.tolist()):
            if c:
                torch.mm(x_AD[start:start + c], w_EDH[e], out=y_AH[start:start + c])
            start += c
        y_AH[start:] = 0                   # padding rows
        return y_AH
    E = w_EDH.shape[0]
    group_A, pos_A, M = _group_positions(counts_E, x_AD.shape[0])
    y_EMH = torch.bmm(_pad(x_AD, group_A, pos_A, E, M), w_EDH)
    y_EMH = torch.cat([y_EMH, y_EMH.new_zeros(1, M, y_EMH.shape[-1])])     # padding rows read zeros
    return y_EMH[group_A, pos_A]


def _cpu_wgrad_loop(x_AD: Tensor, dy_AH: Tensor, counts_E: Tensor, dw_EDH: Tensor, *, accumulate: bool) -> Tensor:
    """One GEMM per group into ``dw_EDH``: ``dw[e] = x[rows of e]^T dy[rows of e]``, or ``+=`` with
    ``accumulate`` (the GEMM adds into the gradient: no temporary, one pass). Padding rows are left out."""
    xt_DA = x_AD.t()
    start = 0
    for e, c in enumerate(counts_E.tolist()):
        if c and accumulate:
            dw_EDH[e].addmm_(xt_DA[:, start:start + c], dy_AH[start:start + c])
        elif c:
            torch.mm(xt_DA[:, start:start + c], dy_AH[start:start + c], out=dw_EDH[e])
        elif not accumulate:
            dw_EDH[e].zero_()              # an expert with no rows has a zero gradient
        start += c
    return dw_EDH


def _wgrad_kernel(x_AD: Tensor, dy_AH: Tensor, counts_E: Tensor) -> Tensor:
    """dw[e] = x[rows of e]^T @ dy[rows of e] (no autograd); padding rows are left out."""
    E = counts_E.shape[0]
    if x_AD.shape[0] > 0 and native_supported(x_AD, dy_AH):
        return F.grouped_mm(x_AD.t(), dy_AH, offs=_offsets(counts_E))
    if x_AD.device.type == "cpu":
        return _cpu_wgrad_loop(x_AD, dy_AH, counts_E, x_AD.new_empty(E, x_AD.shape[-1], dy_AH.shape[-1]),
                               accumulate=False)
    group_A, pos_A, M = _group_positions(counts_E, x_AD.shape[0])
    return torch.bmm(_pad(x_AD, group_A, pos_A, E, M).transpose(1, 2), _pad(dy_AH, group_A, pos_A, E, M))


# The kernels are registered as custom operators with their own shape functions, so ``torch.compile``
# traces a grouped matmul as one opaque node (torch's own meta function for ``_grouped_mm`` accepts
# bf16 only) and the dynamic per-expert sizes never reach the graph.
@torch.library.custom_op("moekit::grouped_mm", mutates_args=())
def _grouped_mm_op(x_AD: Tensor, w_EDH: Tensor, counts_E: Tensor, fuse_grad_accumulation: bool = False) -> Tensor:
    return _mm_kernel(x_AD.contiguous(), w_EDH, counts_E)


@_grouped_mm_op.register_fake
def _(x_AD: Tensor, w_EDH: Tensor, counts_E: Tensor, fuse_grad_accumulation: bool = False) -> Tensor:
    return x_AD.new_empty(x_AD.shape[0], w_EDH.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_wgrad", mutates_args=())
def _grouped_mm_wgrad_op(x_AD: Tensor, dy_AH: Tensor, counts_E: Tensor) -> Tensor:
    return _wgrad_kernel(x_AD.contiguous(), dy_AH.contiguous(), counts_E)


@_grouped_mm_wgrad_op.register_fake
def _(x_AD: Tensor, dy_AH: Tensor, counts_E: Tensor) -> Tensor:
    return x_AD.new_empty(counts_E.shape[0], x_AD.shape[-1], dy_AH.shape[-1])


@torch.library.custom_op("moekit::grouped_mm_wgrad_accumulate", mutates_args=("dw_EDH",))
def _grouped_mm_wgrad_accumulate_op(x_AD: Tensor, dy_AH: Tensor, counts_E: Tensor, dw_EDH: Tensor) -> None:
    """dw[e] += x[rows of e]^T @ dy[rows of e], in place."""
    x_AD, dy_AH = x_AD.contiguous(), dy_AH.contiguous()
    if x_AD.device.type != "cpu":
        dw_EDH.add_(_wgrad_kernel(x_AD, dy_AH, counts_E).to(dw_EDH.dtype))
        return
    _cpu_wgrad_loop(x_AD, dy_AH, counts_E, dw_EDH, accumulate=True)


def _fusable(w: Tensor, x_AD: Tensor) -> bool:
    """Whether the backward may add straight into ``w.grad``: a leaf whose gradient exists, matches it
    and would otherwise only be accumulated (eager mode; under ``torch.compile`` autograd does it)."""
    if torch.compiler.is_compiling() or not (w.is_leaf and w.requires_grad):
        return False
    g = w.grad
    return (g is not None and g.shape == w.shape and g.dtype == w.dtype == x_AD.dtype and g.device == w.device
            and g.layout == torch.strided and g.is_contiguous())


def _setup_context(ctx, inputs, output):
    x_AD, w_EDH, counts_E, fuse = inputs
    ctx.save_for_backward(x_AD, w_EDH, counts_E)
    ctx.fuse_target = w_EDH if fuse else None     # the parameter itself: its .grad is read at backward time


def _backward(ctx, dy_AH: Tensor):
    x_AD, w_EDH, counts_E = ctx.saved_tensors
    dy_AH = dy_AH.contiguous()
    dx = dw = None
    if ctx.needs_input_grad[0]:
        dx = _grouped_mm_op(dy_AH, w_EDH.transpose(1, 2), counts_E)
    if ctx.needs_input_grad[1]:
        target = ctx.fuse_target
        if target is not None and _fusable(target, x_AD):
            _grouped_mm_wgrad_accumulate_op(x_AD, dy_AH, counts_E, target.grad)
        else:
            dw = _grouped_mm_wgrad_op(x_AD, dy_AH, counts_E).to(w_EDH.dtype)
    return dx, dw, None, None


_grouped_mm_op.register_autograd(_backward, setup_context=_setup_context)


def grouped_mm(x_AD: Tensor, w_EDH: Tensor, counts_E: Tensor, *, fuse_grad_accumulation: bool = False) -> Tensor:
    """Differentiable grouped matmul. ``counts_E`` (int64, sum = A) gives each expert's row count.

    ``fuse_grad_accumulation``: when ``w_EDH`` is a parameter whose ``.grad`` exists, the backward adds
    its gradient into ``.grad`` directly (no temporary; autograd hooks on ``w_EDH`` do not run). See the
    module docstring."""
    if x_AD.dim() != 2 or w_EDH.dim() != 3 or x_AD.shape[1] != w_EDH.shape[1]:
        raise ValueError(f"grouped_mm: expected x (A, D) and w (E, D, H), got {tuple(x_AD.shape)} and "
                         f"{tuple(w_EDH.shape)}")
    if counts_E.shape != (w_EDH.shape[0],):
        raise ValueError(f"counts: expected shape ({w_EDH.shape[0]},), got {tuple(counts_E.shape)}")
    if not isinstance(fuse_grad_accumulation, bool):
        raise TypeError(f"fuse_grad_accumulation: must be a bool, got {fuse_grad_accumulation!r}")
    return _grouped_mm_op(x_AD, w_EDH, counts_E, fuse_grad_accumulation)


def grouped_mm_reference(x_AD: Tensor, w_EDH: Tensor, counts_E: Tensor) -> Tensor:
    """Obviously-right per-expert loop; tests use it as the oracle (padding rows: zeros)."""
    sizes = counts_E.tolist()
    chunks = torch.split(x_AD, sizes + [x_AD.shape[0] - sum(sizes)], dim=0)
    out = [c @ w_EDH[e] for e, c in enumerate(chunks[:-1])]
    return torch.cat(out + [x_AD.new_zeros(chunks[-1].shape[0], w_EDH.shape[-1])], dim=0)
