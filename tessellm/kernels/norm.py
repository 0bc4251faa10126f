"""RMSNorm in Triton, plain and with the residual add, one row per program; and the same
kernel quantizing its output to fp8 per token (the fp8 activation fold, ``fp8_rows.py``).

Matches ``backends/reference/ops.py`` including its rounding points: normalize in float32, round
to x's dtype, then multiply by the weight. ``add_rms_norm_row`` is shared with the cuda
backend's fused all-reduce + norm. Rows are ``[rows, hidden]`` with a contiguous last dimension.
The fp8 variant rounds the normed row to the output dtype, then quantizes it as
``gemm/fp8._fp8_quant_rows_kernel`` does, so it is bitwise RMSNorm then that kernel.

Every kernel that normalizes a row must get the same ``rstd`` bits from the same row (the fp8
variant, the all-reduce + norm of ``backends/cuda/allreduce_norm.py``): the sum of squares is a
``pairwise_sum`` (its order fixed by index, not by the layout each kernel's loads and stores
lead the compiler to pick) and the kernels launch with FMA contraction off
(``NORM_LAUNCH_OPTIONS``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.fp8_rows import (check_fp8_dtype, fp8_max, fp8_quantize, fp8_row_buffers,
                                       fp8_row_scale)
from tessellm.kernels.host_ints import next_power_of_2
from tessellm.kernels.launch import fast_launch
from tessellm.kernels.pairwise_sum import pairwise_sum
from tessellm.kernels.pdl import pdl_args, pdl_start

# Launch options of every kernel that calls ``rms_norm_value``: no FMA contraction, so the
# squares and the pairwise sum's adds stay separate roundings in every kernel (``pairwise_sum``).
NORM_LAUNCH_OPTIONS = {"enable_fp_fusion": False}

TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@triton.jit
def rms_norm_value(xf, w_ptr, cols, mask, hidden, eps, dt: tl.constexpr):
    """``weight * round_dt(xf * rstd)`` in float32 for a row ``xf`` (float32 holding values
    of ``dt``); the caller rounds it to its output dtype. The kernel launches with
    ``NORM_LAUNCH_OPTIONS``."""
    rstd = 1.0 / tl.sqrt(pairwise_sum(xf * xf) / hidden + eps)
    xn = (xf * rstd).to(dt).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    return w * xn


@triton.jit
def add_residual_row(x, res_ptrs, res_out_ptrs, mask):
    """``x`` (float32) + the row at ``res_ptrs``, rounded to ``res_out``'s dtype and stored
    there; returned as float32."""
    r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    xr = (x + r).to(res_out_ptrs.dtype.element_ty)
    tl.store(res_out_ptrs, xr, mask=mask)
    return xr.to(tl.float32)


@triton.jit
def add_rms_norm_row(x, res_ptrs, res_out_ptrs, w_ptr, out_ptrs, cols, mask, hidden, eps):
    """The residual-add RMSNorm of one row: ``x`` (float32) + the row at ``res_ptrs`` is
    stored (rounded) at ``res_out_ptrs``, normalized, rounded again, times the weight, and
    stored at ``out_ptrs``. Shared with the fused all-reduce (``allreduce_norm.py``)."""
    xf = add_residual_row(x, res_ptrs, res_out_ptrs, mask)
    y = rms_norm_value(xf, w_ptr, cols, mask, hidden, eps, res_out_ptrs.dtype.element_ty)
    tl.store(out_ptrs, y.to(out_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, hidden, eps,
                     stride_x, stride_res, stride_out, stride_res_out,
                     HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """One row per program. With a residual: r = x + res is stored to res_out, then normed."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        add_rms_norm_row(x, res_ptr + row * stride_res + cols,
                         res_out_ptr + row * stride_res_out + cols, w_ptr,
                         out_ptr + row * stride_out + cols, cols, mask, hidden, eps)
    else:
        y = rms_norm_value(x, w_ptr, cols, mask, hidden, eps, x_ptr.dtype.element_ty)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_fp8_kernel(x_ptr, res_ptr, w_ptr, q_ptr, s_ptr, res_out_ptr, hidden, eps,
                         stride_x, stride_res, stride_q, stride_res_out,
                         OUT_DTYPE: tl.constexpr, FP8_MAX: tl.constexpr,
                         HAS_RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """``_rms_norm_kernel`` whose output row (rounded to ``OUT_DTYPE``) is quantized per token:
    codes to ``q``, the row's scale to ``s`` (``fp8_rows``); nothing in the model dtype."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        xf = add_residual_row(x, res_ptr + row * stride_res + cols,
                              res_out_ptr + row * stride_res_out + cols, mask)
        y = rms_norm_value(xf, w_ptr, cols, mask, hidden, eps, res_out_ptr.dtype.element_ty)
    else:
        y = rms_norm_value(x, w_ptr, cols, mask, hidden, eps, x_ptr.dtype.element_ty)
    y = y.to(OUT_DTYPE).to(tl.float32)
    scale = fp8_row_scale(tl.max(tl.abs(y), 0), FP8_MAX)
    q = fp8_quantize(y, scale, FP8_MAX)
    tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` (a view when possible; ``x`` itself when it is one: no op a
    layer and step on the eager path, where each aten op costs host time)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x if x.dim() == 2 else x.reshape(-1, x.shape[-1])


def promoted(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """``torch.promote_types(a, b)``, without the op call when they are the same dtype (the
    usual case: a norm's weight, input and residual all in the model dtype)."""
    return a if a == b else torch.promote_types(a, b)


def shaped_as(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``t`` (rows of ``x``) viewed in ``x``'s shape: ``t`` itself when ``x`` is 2-D."""
    return t if x.dim() == 2 else t.view(x.shape)


def residual_buffers(x: torch.Tensor, residual: torch.Tensor):
    """``(x2, r2, new_res, res_result)`` of a residual add: ``new_res`` is ``r2`` itself (the
    sum overwrites the residual) when its dtype and layout allow; ``res_result`` is the sum as
    the op returns it (x's shape)."""
    x2, r2 = _rows(x), _rows(residual)
    res_dtype = promoted(x.dtype, residual.dtype)
    in_place = res_dtype == residual.dtype and r2.data_ptr() == residual.data_ptr()
    new_res = r2 if in_place else torch.empty(r2.shape, dtype=res_dtype, device=x.device)
    return x2, r2, new_res, residual if in_place else shaped_as(new_res, x)


def add_norm_buffers(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """Rows and outputs of a residual-add RMSNorm: ``(x2, r2, out, new_res, result)``
    (``residual_buffers``), ``result`` what the op returns once a kernel has filled
    ``out``/``new_res``."""
    x2, r2, new_res, res_result = residual_buffers(x, residual)
    out = torch.empty(x2.shape, dtype=promoted(weight.dtype, new_res.dtype), device=x.device)
    return x2, r2, out, new_res, (shaped_as(out, x), res_result)


def _launch(kernel, x2, r2, weight, outs, new_res, eps, **consts):
    """One program per row of ``x2``; ``outs``: the kernel's output pointers after the weight
    (``out``, or ``q, s``). The block and warps are the same for every variant."""
    rows, hidden = x2.shape
    if rows == 0:
        return
    block = next_power_of_2(hidden)
    has_res = r2 is not None
    first = outs[0]
    fast_launch(kernel)(  # (kernels/launch.py: no per-call binding on a hit)
        (rows,), (x2, r2 if has_res else x2, weight.contiguous(), *outs,
                  new_res if has_res else first),
        (hidden, eps, x2.stride(0), r2.stride(0) if has_res else 0, first.stride(0),
         new_res.stride(0) if has_res else 0),
        {"HAS_RESIDUAL": has_res, "BLOCK": block, "num_warps": min(16, max(1, block // 512)),
         **consts, **NORM_LAUNCH_OPTIONS, **pdl_args(x2.device)})


def launch_rms_norm(x2, r2, weight, out, new_res, eps) -> None:
    """``_rms_norm_kernel`` over ``x2`` (with the residual ``r2`` -> ``new_res`` when given)."""
    _launch(_rms_norm_kernel, x2, r2, weight, (out,), new_res, eps)


def launch_rms_norm_fp8(x2, r2, weight, new_res, eps, out_dtype: torch.dtype,
                        fp8_dtype: torch.dtype):
    """``_rms_norm_fp8_kernel`` over ``x2``: returns ``(q [rows, hidden], scales [rows, 1])``;
    the normed rows are rounded to ``out_dtype`` before they are quantized."""
    check_fp8_dtype(fp8_dtype)
    q, s = fp8_row_buffers(x2.shape[0], x2.shape[1], fp8_dtype, x2.device)
    _launch(_rms_norm_fp8_kernel, x2, r2, weight, (q, s), new_res, eps,
            OUT_DTYPE=TL_DTYPES[out_dtype], FP8_MAX=fp8_max(fp8_dtype))
    return q, s
