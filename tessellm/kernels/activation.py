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
def _silu_and_mul_fp8_kernel(x_ptr, q_ptr, s_ptr, d, stride_x, stride_q,
                             FP8_MAX: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """One program per row, two passes over its d columns (as the row quantizer): the product's
    max |y|, then the codes of the product computed again (the same bits: same arithmetic)."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
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


def launch_silu_and_mul_fp8(x2: torch.Tensor, fp8_dtype: torch.dtype):
    """``_silu_and_mul_fp8_kernel`` over ``x2 [rows, 2d]`` (last dim contiguous): returns
    ``(q [rows, d], scales [rows, 1])``."""
    check_fp8_dtype(fp8_dtype)
    rows, d = x2.shape[0], x2.shape[1] // 2
    q, s = fp8_row_buffers(rows, d, fp8_dtype, x2.device)
    if rows:
        block = min(2048, triton.next_power_of_2(d)) if x2.device.type != "cpu" else 64
        _silu_and_mul_fp8_kernel[(rows,)](
            x2, q, s, d, x2.stride(0), q.stride(0), FP8_MAX=fp8_max(fp8_dtype), BLOCK=block,
            num_warps=4 if d >= 1024 else 1, **pdl_args(x2.device))
    return q, s
