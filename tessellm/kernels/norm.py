"""RMSNorm in Triton, plain and with the residual add, one row per program.

Matches ``backends/reference/ops.py`` including its rounding points: normalize in float32, round
to x's dtype, then multiply by the weight. ``add_rms_norm_row`` is shared with the cuda
backend's fused all-reduce + norm. Rows are ``[rows, hidden]`` with a contiguous last dimension.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_start


@triton.jit
def add_rms_norm_row(x, res_ptrs, res_out_ptrs, w_ptr, out_ptrs, cols, mask, hidden, eps):
    """The residual-add RMSNorm of one row: ``x`` (float32) + the row at ``res_ptrs`` is
    stored (rounded) at ``res_out_ptrs``, normalized, rounded again, times the weight, and
    stored at ``out_ptrs``. Shared with the fused all-reduce (``allreduce_norm.py``)."""
    r = tl.load(res_ptrs, mask=mask, other=0.0).to(tl.float32)
    xr = (x + r).to(res_out_ptrs.dtype.element_ty)
    tl.store(res_out_ptrs, xr, mask=mask)
    xf = xr.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / hidden + eps)
    xn = (xf * rstd).to(res_out_ptrs.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptrs, (w * xn).to(out_ptrs.dtype.element_ty), mask=mask)


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
        rstd = 1.0 / tl.sqrt(tl.sum(x * x, 0) / hidden + eps)
        xn = (x * rstd).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + row * stride_out + cols, (w * xn).to(out_ptr.dtype.element_ty),
                 mask=mask)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` as ``[rows, last]`` (a view when possible)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def add_norm_buffers(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor):
    """Rows and outputs of a residual-add RMSNorm: ``(x2, r2, out, new_res, result)``;
    ``new_res`` is ``r2`` itself (the sum overwrites the residual) when its dtype and layout
    allow, and ``result`` is what the op returns once a kernel has filled ``out``/``new_res``."""
    x2, r2 = _rows(x), _rows(residual)
    res_dtype = torch.promote_types(x.dtype, residual.dtype)
    in_place = res_dtype == residual.dtype and r2.data_ptr() == residual.data_ptr()
    new_res = r2 if in_place else torch.empty(r2.shape, dtype=res_dtype, device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(weight.dtype, res_dtype),
                      device=x.device)
    return x2, r2, out, new_res, (out.view(x.shape),
                                  residual if in_place else new_res.view(x.shape))
