"""Dynamic per-token fp8 quantization of a row, in one definition for every kernel that does it:
the stand-alone ``gemm/fp8._fp8_quant_rows_kernel`` (before a W8A8 GEMM) and the kernels that
quantize the activation they produce (the fp8 activation fold: ``norm._rms_norm_fp8_kernel``,
``activation._silu_and_mul_fp8_kernel``). Sharing the arithmetic is what makes a folded kernel
bitwise the unfused pair (its producer's output rounded to the model dtype, then this)::

    scale = max(max_k |x[k]|, 1e-12) / FP8_MAX          float32, one per row
    q[k]  = fp8(clamp(x[k] / scale, -FP8_MAX, FP8_MAX))

The max is exact in any order, so how a kernel splits the row into blocks does not matter.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

_FP8_MAX = {}  # dtype -> torch.finfo(dtype).max (finfo costs a microsecond a call)


@triton.jit
def fp8_row_scale(amax, FP8_MAX: tl.constexpr):
    """The row's scale from its ``amax`` (a float32 scalar: max |x| over the row), the IEEE
    quotient (``div_rn``: ``/`` by a constant is an approximate reciprocal times amax in some
    Triton versions, a ``div.full`` in others; this is torch's ``amax / FP8_MAX``)."""
    return tl.math.div_rn(tl.maximum(amax, 1e-12), FP8_MAX)


@triton.jit
def fp8_quantize(x, scale, FP8_MAX: tl.constexpr):
    """``x / scale`` clamped to the fp8 range, float32: the caller casts it to its fp8 dtype."""
    return tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)


def fp8_max(fp8_dtype: torch.dtype) -> float:
    """The largest finite value of ``fp8_dtype`` (448 for e4m3fn, 240 for e4m3fnuz)."""
    fmax = _FP8_MAX.get(fp8_dtype)
    if fmax is None:
        fmax = _FP8_MAX.setdefault(fp8_dtype, torch.finfo(fp8_dtype).max)
    return fmax


def fp8_row_buffers(rows: int, k: int, fp8_dtype: torch.dtype, device: torch.device):
    """Outputs of a per-token quantization: ``(q [rows, k] fp8, scales [rows, 1] float32)``."""
    return (torch.empty(rows, k, dtype=fp8_dtype, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def check_fp8_dtype(fp8_dtype: torch.dtype) -> None:
    if fp8_dtype not in (torch.float8_e4m3fn, torch.float8_e4m3fnuz):
        raise ValueError(f"Per-token fp8 quantization takes float8_e4m3fn or float8_e4m3fnuz, "
                         f"got {fp8_dtype}.")

