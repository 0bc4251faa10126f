"""W8A8 fp8 for prefill: x quantized per token by one Triton kernel, then ``torch._scaled_mm``
(row-wise scales, sm89+) or, without it, ``_fp8_gemm_kernel`` (tiles widened to fp16, exact).

The Triton GEMM is deterministic: with split-K each K range writes its own float32 partial
product and ``torch.sum`` adds them in split order (fp32 atomics would add them in whatever order
the programs finish, so two calls on the same inputs could differ in the last bit, and the fp8
activation fold's pre-quantized product would not be bitwise ``fp8_mm``).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (
    _capability,
    _epilogue,
    _interpreted,
    _split_out,
    _split_stride,
    _split_sum,
    _tile_ranges,
    _tiles,
    _xw_tiles,
)
from tessellm.kernels.fp8_rows import fp8_max, fp8_quantize, fp8_row_buffers, fp8_row_scale
from tessellm.quantization.packed import Fp8Weight


@triton.jit
def _fp8_quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                           FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: the row's scale and codes (``fp8_rows``), two passes over K."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = fp8_row_scale(tl.max(amax, 0), FP8_MAX)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = fp8_quantize(x, scale, FP8_MAX)
        tl.store(q_ptr + m * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)
    tl.store(s_ptr + m, scale)


@triton.jit
def _fp8_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_xm, stride_wn, stride_om, stride_split,
                     HAS_BIAS: tl.constexpr, SPLIT_K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """x, w fp8 (``[M, K]``, ``[N, K]``); y = (x @ w.T) * sx[m] * sw[n]. The tiles are widened
    to fp16 (exact for e4m3) for the dot, or to float32 in the interpreter (DOT_FP32). This is
    the fallback where ``torch._scaled_mm`` cannot run, so it favours portability over speed.
    Split ``pid_k`` stores its partial product at ``out_ptr + pid_k * stride_split`` (the bias
    in split 0's)."""
    pid_k, rm, rn, k_lo, k_hi = _tile_ranges(K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = _xw_tiles(x_row, w_col, rm, rn, k0, k_hi, M, N, BLOCK_K)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x.to(tl.float16), w.to(tl.float16))
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k, HAS_BIAS)


def quantize_fp8_rows(x: torch.Tensor, fp8_dtype: torch.dtype,
                      keepdim: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: ``(x_q [M, K], scales [M] fp32)`` in one kernel launch
    (``keepdim``: scales ``[M, 1]``, as ``torch._scaled_mm`` takes them)."""
    if not x.is_contiguous():
        x = x.contiguous()
    m, k = x.shape
    q, scales = fp8_row_buffers(m, k, fp8_dtype, x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k)) if x.device.type != "cpu" else 64
        _fp8_quant_rows_kernel[(m,)](x, q, scales, k, x.stride(0), k, FP8_MAX=fp8_max(fp8_dtype),
                                     BLOCK=block, num_warps=4 if k >= 1024 else 1)
    return q, (scales if keepdim else scales.view(m))


def scaled_mm_plan(x: torch.Tensor, w: Fp8Weight):
    """``(w.qweight.t(), w.scales as [1, N])`` for ``torch._scaled_mm`` where it runs for this
    weight (``_scaled_mm_ok``), else None; cached on ``w`` (checked against the weight's
    storage, so a replaced buffer gets a fresh plan). Saves the per-call checks and views."""
    qweight = w.qweight
    plan = w.__dict__.get("_scaled_mm_plan")
    if plan is not None and plan[0] == qweight.data_ptr():
        return plan[1]
    ok = _scaled_mm_ok(x, w)
    value = (qweight.t(), w.scales.view(1, -1)) if ok else None
    w.__dict__["_scaled_mm_plan"] = (qweight.data_ptr(), value)
    return value


def fp8_gemm(xq: torch.Tensor, sx: torch.Tensor, w: Fp8Weight, out_dtype: torch.dtype,
             bias=None) -> torch.Tensor:
    """The Triton W8A8 GEMM: ``(xq @ w.qweight.T) * sx[:, None] * w.scales[None, :]``; the
    same bits on every call (split-K partials summed in split order)."""
    m, k = xq.shape
    n = w.qweight.shape[0]
    t = _tiles(xq, m, n, k, k)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(xq, m, n, split, out_dtype)
    _fp8_gemm_kernel[grid](
        xq, sx, w.qweight, w.scales, bias if bias is not None else sx, out, m, n, k,
        xq.stride(0), w.qweight.stride(0), out.stride(-2), _split_stride(out),
        HAS_BIAS=bias is not None, DOT_FP32=_interpreted(xq), **t)
    return _split_sum(out, out_dtype)


def _scaled_mm_ok(x: torch.Tensor, w: Fp8Weight) -> bool:
    """torch._scaled_mm with row-wise scales: sm89+, K and N multiples of 16, and a one-row
    probe on this device that ran (some torch/cuBLASLt builds lack row-wise fp8)."""
    if _interpreted(x) or not hasattr(torch, "_scaled_mm"):
        return False
    n, k = w.qweight.shape
    index = x.device.index or 0
    return (_capability(index) >= (8, 9) and k % 16 == 0 and n % 16 == 0
            and _scaled_mm_probe(index, w.qweight.dtype))


@functools.lru_cache(maxsize=None)
def _scaled_mm_probe(index: int, fp8_dtype: torch.dtype) -> bool:
    """Runs once per device, at the first fp8 GEMM (the engine's eager profile run, never
    inside a graph capture). False: the Triton fp8 GEMM serves instead."""
    dev = torch.device("cuda", index)
    a = torch.ones(1, 32, device=dev).to(fp8_dtype)
    b = torch.ones(32, 32, device=dev).to(fp8_dtype)
    try:
        out = torch._scaled_mm(a, b.t(), scale_a=torch.ones(1, 1, device=dev),
                               scale_b=torch.ones(1, 32, device=dev), out_dtype=torch.bfloat16)
        return bool(out.float().sum().item() == 32 * 32)
    except (RuntimeError, TypeError):
        return False
