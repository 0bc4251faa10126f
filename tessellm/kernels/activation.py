"""SiLU-and-mul in Triton: ``silu(x[:, :d]) * x[:, d:]``, the SiLU output rounded to x's dtype
before the multiply (as the reference). ``silu_mul`` is that arithmetic on float32 values; the
one-row GEMVs (``gemm/gemv.py``, ``gemm/gemv_x2.py``) run it in their epilogue too, so their
fused gate_up + SiLU-and-mul rounds exactly as this kernel after the unfused GEMV.
"""

from __future__ import annotations

import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_start


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
