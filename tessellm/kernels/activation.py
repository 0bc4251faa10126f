"""SiLU-and-mul in Triton: ``silu(x[:, :d]) * x[:, d:]``, the SiLU output rounded to x's dtype
before the multiply (as the reference).
"""

from __future__ import annotations

import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_start


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, d, stride_x, stride_out, BLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < d
    a = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + row * stride_x + d + cols, mask=mask, other=0.0).to(tl.float32)
    dt = out_ptr.dtype.element_ty
    silu = (a / (1.0 + tl.exp(-a))).to(dt).to(tl.float32)
    tl.store(out_ptr + row * stride_out + cols, (silu * b).to(dt), mask=mask)
