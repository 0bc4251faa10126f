"""Block-wise fp8 W8A8 (Qwen3-FP8, DeepSeek-V3): x quantized per token and group of ``bk``
inputs by one kernel, then a GEMM that scales each K block's partial product by the
activation's group scale and the weight's block scale (``quantization/fp8_block.py``)::

    for each K step k0 (BLOCK_K divides bk, so a step lies in one block j = k0 // bk):
        part = dot(qx[rm, k0:k0+BLOCK_K], q[rn, k0:k0+BLOCK_K].T)      exact products, fp32 sum
        acc += part * sx[rm, j] * sw[rn // bn, j]

The dot takes the e4m3 tiles as they are where the GPU has fp8 tensor cores (NVIDIA sm89+,
e4m3fn); elsewhere both tiles are widened to fp16 first (exact: every e4m3 value, subnormals
included, is an fp16 value), and to float32 in Triton's interpreter. Split-K as the other GEMMs
(``common.py``: a float32 plane per K range, summed in order; no atomics). The oracle is
``quantization.fp8_block.w8a8_block_reference``.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.fp8_rows import fp8_max, fp8_quantize, fp8_row_scale
from tessellm.kernels.gemm.common import (_capability, _epilogue, _interpreted, _split_out,
                                          _split_stride, _split_sum, _tile_ranges, _tiles,
                                          _xw_tiles)
from tessellm.kernels.gemm.w8a8 import _round_e4m3
from tessellm.quantization.fp8_block import Fp8BlockWeight

DOT_NATIVE, DOT_FP16, DOT_FP32 = 0, 1, 2


@triton.jit
def _group_quant_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm, stride_sm,
                        GROUP: tl.constexpr, FP8_MAX: tl.constexpr, ROUND: tl.constexpr):
    """Program (m, j): group j of row m, its scale ``max(amax, 1e-12) / FP8_MAX`` and codes.
    ROUND: round to e4m3 in float32 first (the interpreter's own cast can round wrong)."""
    m, j = tl.program_id(0).to(tl.int64), tl.program_id(1)
    k = j * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
    scale = fp8_row_scale(tl.max(tl.abs(x), 0), FP8_MAX)
    q = fp8_quantize(x, scale, FP8_MAX)
    if ROUND:
        q = _round_e4m3(q)
    tl.store(q_ptr + m * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)
    tl.store(s_ptr + m * stride_sm + j, scale)


@triton.jit
def _block_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K,
                       stride_xm, stride_sxm, stride_wn, stride_swn, stride_om, stride_split,
                       SPLIT_K, HAS_BIAS: tl.constexpr, ROW_BLOCK: tl.constexpr,
                       GROUP_K: tl.constexpr, DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``y = sum_j sx[m, j] sw[n // ROW_BLOCK, j] (qx_j @ q_j.T)`` over the program's K range."""
    pid_k, rm, rn, k_lo, k_hi = _tile_ranges(K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    sx_row = sx_ptr + rm.to(tl.int64) * stride_sxm
    sw_row = sw_ptr + (tl.minimum(rn, N - 1) // ROW_BLOCK).to(tl.int64) * stride_swn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        x, w = _xw_tiles(x_row, w_col, rm, rn, k0, k_hi, M, N, BLOCK_K)
        if DOT == 0:
            part = tl.dot(x, w)
        elif DOT == 1:
            part = tl.dot(x.to(tl.float16), w.to(tl.float16))
        else:
            part = tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        j = k0 // GROUP_K
        sx = tl.load(sx_row + j, mask=rm < M, other=0.0)
        sw = tl.load(sw_row + j)
        acc += part * sx[:, None] * sw[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k, HAS_BIAS)


def quantize_fp8_groups(x: torch.Tensor, group: int, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """Per token and group of ``group`` inputs: ``(qx [M, K] fp8, scales [M, ceil(K/group)]
    float32)``, one launch (``quantization.fp8_block.quantize_per_token_group``'s arithmetic)."""
    x = x.contiguous()
    m, k = x.shape
    groups = triton.cdiv(k, group)
    q = torch.empty(m, k, dtype=fp8_dtype, device=x.device)
    s = torch.empty(m, groups, dtype=torch.float32, device=x.device)
    if m:
        _group_quant_kernel[(m, groups)](x, q, s, k, x.stride(0), q.stride(0), s.stride(0),
                                         GROUP=group, FP8_MAX=fp8_max(fp8_dtype),
                                         ROUND=_interpreted(x), num_warps=4 if group >= 512 else 1)
    return q, s


def _dot_mode(x: torch.Tensor, fp8_dtype: torch.dtype, block_k: int) -> int:
    """fp8 tensor cores take K tiles of 32 or more: a checkpoint's K blocks below that (never
    in a published one; 128 is the norm) widen to fp16, which takes 16."""
    if _interpreted(x):
        return DOT_FP32
    native = (torch.version.hip is None and fp8_dtype == torch.float8_e4m3fn and block_k >= 32
              and _capability(x.device.index or 0) >= (8, 9))
    return DOT_NATIVE if native else DOT_FP16


def fp8_block_gemm(qx: torch.Tensor, sx: torch.Tensor, w: Fp8BlockWeight,
                   out_dtype: torch.dtype, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The W8A8 product of activations already quantized per group (``quantize_fp8_groups``)
    with a block-wise fp8 weight, in ``out_dtype`` (+ bias)."""
    m, k = qx.shape
    n = w.qweight.shape[0]
    bn, bk = w.block
    if w.qweight.shape[1] != k or sx.shape != (m, triton.cdiv(k, bk)):
        raise ValueError(f"fp8_block_gemm: x {tuple(qx.shape)} with scales {tuple(sx.shape)} "
                         f"does not fit a {tuple(w.qweight.shape)} weight in blocks of {bk}")
    if m == 0:
        return torch.empty(0, n, dtype=out_dtype, device=qx.device)
    t = _tiles(qx, m, n, k, bk)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(qx, m, n, split, out_dtype)
    _block_gemm_kernel[grid](
        qx, sx, w.qweight, w.scales, bias if bias is not None else sx, out, m, n, k,
        qx.stride(0), sx.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(-2),
        _split_stride(out), HAS_BIAS=bias is not None, ROW_BLOCK=bn, GROUP_K=bk,
        DOT=_dot_mode(qx, w.qweight.dtype, t["BLOCK_K"]), **t)
    return _split_sum(out, out_dtype)


def fp8_block_mm(x: torch.Tensor, w: Fp8BlockWeight, bias=None) -> torch.Tensor:
    """``QuantOps.fp8_block_mm`` on Triton: x quantized per token and group, then the GEMM;
    ``[M, N]`` in x's dtype."""
    qx, sx = quantize_fp8_groups(x, w.block[1], w.qweight.dtype)
    return fp8_block_gemm(qx, sx, w, x.dtype, bias)
