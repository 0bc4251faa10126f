"""SiLU-and-mul in Triton: ``silu(x[:, :d]) * x[:, d:]``, the SiLU output rounded to x's dtype
before the multiply (as the reference). ``silu_mul`` is that arithmetic on float32 values; the
one-row GEMVs (``gemm/gemv.py``, ``gemm/gemv_x2.py``) run it in their epilogue too, so their
fused gate_up + SiLU-and-mul rounds exactly as this kernel after the unfused GEMV.

``_silu_and_mul_fp8_kernel`` quantizes the product to fp8 per token in the same program (the
fp8 activation fold, ``fp8_rows.py``): bitwise this kernel, then
``gemm/fp8._fp8_quant_rows_kernel``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.fp8_rows import (check_fp8_dtype, fp8_max, fp8_quantize, fp8_row_buffers,
                                       fp8_row_scale)
from tessellm.kernels.pdl import pdl_args, pdl_start


@triton.jit
def silu_mul(a, b, dt: tl.constexpr):
    """``silu(a) * b`` in ``dt``: a and b are float32 holding values of ``dt``; the SiLU output
    is rounded to ``dt`` before the multiply, the product once after."""
    silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
    return (silu * b).to(dt)


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    out = silu_mul(a, b, out_ptr.dtype.element_ty)
    tl.store(out_ptr + row * stride_out + cols, out, mask=mask)


@triton.jit
def _silu_mul_block(x_ptr, row, stride_x, d, k0, BLOCK: tl.constexpr):
    """Columns ``k0 .. k0 + BLOCK`` of the row's product, float32 of x's dtype (0 past d)."""
    cols = k0 + tl.arange(0, BLOCK)
    mask = cols < d
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    return silu_mul(a, b, x_ptr.dtype.element_ty).to(tl.float32), cols, mask


@triton.jit
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, d, stride_x, stride_q, FP8_MAX: tl.constexpr,
                             BLOCK: tl.constexpr, ONE_BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per row. ``ONE_BLOCK`` (d <= BLOCK): the row's product stays in registers
    between its max |y| and its codes. Else two passes over d (as the row quantizer): the max,
    then the codes of the product computed again (the same bits: the same arithmetic)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    if ONE_BLOCK:
        y, cols, mask = _silu_mul_block(x_ptr, row, stride_x, d, 0, BLOCK)
        scale = fp8_row_scale(tl.max(tl.abs(y), 0), FP8_MAX)
        q = fp8_quantize(y, scale, FP8_MAX)
        tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    else:
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        for k0 in range(0, d, BLOCK):
            y, cols, mask = _silu_mul_block(x_ptr, row, stride_x, d, k0, BLOCK)
            amax = tl.maximum(amax, tl.abs(y))
        scale = fp8_row_scale(tl.max(amax, 0), FP8_MAX)
        for k0 in range(0, d, BLOCK):
            y, cols, mask = _silu_mul_block(x_ptr, row, stride_x, d, k0, BLOCK)
            q = fp8_quantize(y, scale, FP8_MAX)
            tl.store(q_ptr + row * stride_q + cols, q.to(q_ptr.dtype.element_ty), mask=mask)
    tl.store(s_ptr + row, scale)


# A row of at most this many products is held in registers (one read of x; Llama-8B's 14336 at
# 16 warps: 32 values a thread); longer rows take two passes of _SILU_FP8_LOOP_BLOCK columns.
# A guess, not timed on a GPU yet (benchmarks/fp8fold_device.sh times the fold as a whole).
SILU_FP8_ROW_MAX = 16384
_SILU_FP8_LOOP_BLOCK = 4096


def launch_silu_and_mul_fp8(x2: torch.Tensor, fp8_dtype: torch.dtype):
    """``_silu_and_mul_fp8_kernel`` over ``x2 [rows, 2d]`` (last dim contiguous): returns
    ``(q [rows, d], scales [rows, 1])``. The interpreter takes blocks of 64 (both paths at
    test sizes)."""
    check_fp8_dtype(fp8_dtype)
    rows, d = x2.shape[0], x2.shape[1] // 2
    q, s = fp8_row_buffers(rows, d, fp8_dtype, x2.device)
    if rows:
        if x2.device.type == "cpu":
            block = 64
        else:
            block = triton.next_power_of_2(d) if d <= SILU_FP8_ROW_MAX else _SILU_FP8_LOOP_BLOCK
        _silu_and_mul_fp8_kernel[(rows,)](
            x2, q, s, d, x2.stride(0), q.stride(0), FP8_MAX=fp8_max(fp8_dtype), BLOCK=block,
            ONE_BLOCK=d <= block, num_warps=min(16, max(1, block // 1024)), **pdl_args(x2.device))
    return q, s
