"""Quantized GEMMs in Triton (dequantize inside the GEMM): the cuda backend's ``QuantOps``.

``y[M, N] = x[M, K] @ W.T`` with W packed (see ``tessellm/quantization/packed.py``). One program
computes a ``[BLOCK_M, BLOCK_N]`` tile of y over a K range; grouped scales are applied per K
tile, so a tile never straddles a group (``BLOCK_K`` divides the group size)::

    for k0 in my K range, step BLOCK_K:            g = k0 // GROUP
        part = dot(x[:, k0:k0+BK], codes[k0:k0+BK, :] - zero_point)   (exact small integers)
        acc += part * scale[g, :]  (+ rowsum(x[:, k0:k0+BK]) * offset[g, :] for int4 offsets)

Small M (decode) is memory-bound: tiles are 16 rows and K is split over ``SPLIT_K`` programs
(fp32 atomics) until the grid fills the GPU. Large M (prefill) is compute-bound: the weight is
dequantized once to x's dtype and cuBLAS does the GEMM (``DEQUANT_MIN_M``).

fp8: up to ``FP8_WEIGHT_ONLY_MAX_M`` rows (decode), W8A16: ``_fp8_w8a16_gemm_kernel`` reads
the e4m3 weight and multiplies it with x as it is, like int8 (half of bf16's bytes, nothing to
quantize); at one or two rows and small N the skinny GEMM of ``gemv.py`` does instead
(``_gemv_fp8_faster``). Above it (prefill), W8A8: x is quantized per token by one Triton
kernel, then ``torch._scaled_mm`` (row-wise scales, sm89+) runs the GEMM on the fp8 tensor
cores; without it, ``_fp8_gemm_kernel`` does (tiles widened to fp16, exact for e4m3). Both
sides of the threshold are static per captured graph: M is fixed per graph.

Widening e4m3 to bf16 with Triton's ``.to`` costs, in sm90 SASS, one ``F2F`` per value plus
an ``F2FP`` per pair: conversion-unit instructions, which issue at a fraction of the integer
ALU's rate. On NVIDIA the weight-only kernel moves bits instead (``e4m3_to_16bit``: byte
permutes, masks, one packed multiply by a power of two; exact, subnormals included), which
leaves only full-rate integer and half-precision instructions. (Read from the SASS; the ``.to``
variant of this kernel was not timed.)

No host-device sync anywhere: graph-capture safe. On the CPU these kernels run in Triton's
interpreter (tests), where bf16 dots run in float32 (the interpreter has no bf16 arithmetic).
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessellm import envs
from tessellm.quantization.packed import Fp8Weight, Int4Weight, Int8Weight

# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, pid_k,
              HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr):
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    ptrs = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if ATOMIC:
        tl.atomic_add(ptrs, acc, mask=ok)
    else:
        tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int8_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_wn, stride_sg, stride_om,
                      GROUP_SIZE: tl.constexpr, PER_CHANNEL: tl.constexpr,
                      HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SPLIT_K,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """w int8 ``[N, K]``; scales ``[G, N]`` (PER_CHANNEL: G = 1, applied once at the end)."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(k_lo + span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0)
        if DOT_FP32:
            x = x.to(tl.float32)
        part = tl.dot(x, w.to(x.dtype), input_precision=DOT_PREC)
        if PER_CHANNEL:
            acc += part
        else:
            s = tl.load(s_ptr + (k0 // GROUP_SIZE) * stride_sg + rn, mask=rn < N, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _int4_gemm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_qk, stride_sg, stride_og, stride_om,
                      GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                      HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr,
                      SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """q int32 ``[K/8, N]`` (8 codes per word along K); scales/offsets ``[G, N]``."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(k_lo + span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        packed = tl.load(q_ptr + (rk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :],
                         mask=k_ok[:, None] & (rn[None, :] < N), other=0)
        codes = (packed >> ((rk % 8) * 4)[:, None]) & 0xF
        if DOT_FP32:
            x = x.to(tl.float32)
        part = tl.dot(x, (codes - ZERO_POINT).to(x.dtype), input_precision=DOT_PREC)
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += part * s[None, :]
        if HAS_OFFSETS:
            off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * off[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def _int4_dequant_kernel(q_ptr, s_ptr, o_ptr, out_ptr, K, N, stride_qk, stride_sg, stride_og,
                         GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                         HAS_OFFSETS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out ``[N, K]`` (x's dtype) = the dense weight, for the large-M cuBLAS path."""
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rk[:, None] < K) & (rn[None, :] < N)
    packed = tl.load(q_ptr + (rk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :], mask=ok,
                     other=0)
    w = (((packed >> ((rk % 8) * 4)[:, None]) & 0xF) - ZERO_POINT).to(tl.float32)
    g = (rk // GROUP_SIZE)[:, None]
    w *= tl.load(s_ptr + g * stride_sg + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_OFFSETS:
        w += tl.load(o_ptr + g * stride_og + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn[None, :].to(tl.int64) * K + rk[:, None],
             w.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _int8_dequant_kernel(w_ptr, s_ptr, out_ptr, N, K, stride_wn, stride_sg,
                         GROUP_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out ``[N, K]`` (x's dtype) = the dense weight, for the large-M cuBLAS path: one read of
    the int8 weight, one write of the dense one."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    ok = (rn[:, None] < N) & (rk[None, :] < K)
    offs = rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    w = tl.load(w_ptr + offs, mask=ok, other=0).to(tl.float32)
    s = tl.load(s_ptr + (rk // GROUP_SIZE)[None, :] * stride_sg + rn[:, None], mask=ok, other=0.0)
    tl.store(out_ptr + rn[:, None].to(tl.int64) * K + rk[None, :],
             (w * s.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _fp8_quant_rows_kernel(x_ptr, q_ptr, s_ptr, K, stride_xm, stride_qm,
                           FP8_MAX: tl.constexpr, BLOCK: tl.constexpr):
    """One program per row: scale = max(|x|) / FP8_MAX, q = x / scale (two passes over K)."""
    m = tl.program_id(0).to(tl.int64)
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(x))
    scale = tl.maximum(tl.max(amax, 0), 1e-12) / FP8_MAX
    for k0 in range(0, K, BLOCK):
        k = k0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + m * stride_xm + k, mask=k < K, other=0.0).to(tl.float32)
        q = tl.minimum(tl.maximum(x / scale, -FP8_MAX), FP8_MAX)
        tl.store(q_ptr + m * stride_qm + k, q.to(q_ptr.dtype.element_ty), mask=k < K)
    tl.store(s_ptr + m, scale)


@triton.jit
def _fp8_gemm_kernel(x_ptr, sx_ptr, w_ptr, sw_ptr, bias_ptr, out_ptr, M, N, K,
                     stride_xm, stride_wn, stride_om,
                     HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SPLIT_K,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     DOT_FP32: tl.constexpr):
    """x, w fp8 (``[M, K]``, ``[N, K]``); y = (x @ w.T) * sx[m] * sw[n]. The tiles are widened
    to fp16 (exact for e4m3) for the dot, or to float32 in the interpreter (DOT_FP32). This is
    the fallback where ``torch._scaled_mm`` cannot run, so it favours portability over speed."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(k_lo + span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        if DOT_FP32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
        else:
            acc += tl.dot(x.to(tl.float16), w.to(tl.float16))
    sx = tl.load(sx_ptr + rm, mask=rm < M, other=0.0)
    sw = tl.load(sw_ptr + rn, mask=rn < N, other=0.0)
    acc = acc * sx[:, None] * sw[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, pid_k, HAS_BIAS, ATOMIC)


@triton.jit
def e4m3_to_16bit(w, BF16: tl.constexpr, PURE: tl.constexpr = True):
    """e4m3fn -> bf16 (BF16) or fp16, exact, 4 values per 32-bit word, without the conversion
    unit. Each byte ``b`` lands in the high byte of a 16-bit lane; sign kept, the 7 other bits
    shifted into the exponent/mantissa fields, which gives the value times 2^-120 (bf16) or
    2^-8 (fp16); one packed multiply restores it (subnormals map to subnormals, also exact;
    NaN codes, which quantizers never write, become +-480). PURE=False pins it where it stands
    (Triton otherwise may move it into the dot's operand loads)::

        bf16: (t & 0x8000) | ((t >> 4) & 0x07F0)    t = b << 8, then * 2^120
        fp16: (t & 0x8000) | ((t >> 1) & 0x3F80)    then * 2^8
    """
    if BF16:
        y = tl.inline_asm_elementwise(
             ("{ .reg .b32 t0, t1, s0, s1, c, z;\n"
              "mov.b32 c, 0x7B807B80;\n"  # 2^120 in both bf16 lanes
              "mov.b32 z, 0x80008000;\n"  # -0: the fma is a plain multiply
              "prmt.b32 t0, $2, 0, 0x1404;\n"
              "prmt.b32 t1, $2, 0, 0x3424;\n"
              "shr.b32 s0, t0, 4;\n"
              "shr.b32 s1, t1, 4;\n"
              "and.b32 t0, t0, 0x80008000;\n"
              "and.b32 t1, t1, 0x80008000;\n"
              "and.b32 s0, s0, 0x07F007F0;\n"
              "and.b32 s1, s1, 0x07F007F0;\n"
              "or.b32 t0, t0, s0;\n"
              "or.b32 t1, t1, s1;\n"
              "fma.rn.bf16x2 $0, t0, c, z;\n"
              "fma.rn.bf16x2 $1, t1, c, z; }"),
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.bfloat16, is_pure=PURE, pack=4)
    else:
        y = tl.inline_asm_elementwise(
             ("{ .reg .b32 t0, t1, s0, s1, c;\n"
              "mov.b32 c, 0x5C005C00;\n"  # 2^8 in both fp16 lanes
              "prmt.b32 t0, $2, 0, 0x1404;\n"
              "prmt.b32 t1, $2, 0, 0x3424;\n"
              "shr.b32 s0, t0, 1;\n"
              "shr.b32 s1, t1, 1;\n"
              "and.b32 t0, t0, 0x80008000;\n"
              "and.b32 t1, t1, 0x80008000;\n"
              "and.b32 s0, s0, 0x3F803F80;\n"
              "and.b32 s1, s1, 0x3F803F80;\n"
              "or.b32 t0, t0, s0;\n"
              "or.b32 t1, t1, s1;\n"
              "mul.rn.f16x2 $0, t0, c;\n"
              "mul.rn.f16x2 $1, t1, c; }"),
            "=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=PURE, pack=4)
    return y


@triton.jit
def _fp8_w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K,
                           stride_xm, stride_wn, stride_om,
                           HAS_BIAS: tl.constexpr, ATOMIC: tl.constexpr, SPLIT_K,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                           W_PTX: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    """w fp8 ``[N, K]`` (per-channel scales ``[N]``), x in the model dtype: y = (x @ w.T) * s.
    W_PTX: widen w with ``e4m3_to_16bit`` (x bf16 or fp16, NVIDIA); else ``w.to(x.dtype)``."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * span
    k_hi = tl.minimum(k_lo + span, K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        if DOT_FP32:
            x = x.to(tl.float32)
        if W_PTX:
            w = e4m3_to_16bit(w, x.dtype == tl.bfloat16)
        acc += tl.dot(x, w.to(x.dtype), input_precision=DOT_PREC)
    acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0)[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, pid_k, HAS_BIAS, ATOMIC)


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------

DEQUANT_MIN_M = 512  # from this many rows on, dequantize once and let cuBLAS multiply
# fp8 GEMMs of at most this many rows read the weight as W8A16 instead of quantizing x for
# torch._scaled_mm, which is slower than bf16 at small M. H200, one Llama-8B layer's GEMMs in a
# CUDA graph (benchmarks/quantization/fp8_kernels.py): W8A16 81-92 us vs W8A8 132-137 us at
# M = 1..16, 112.5 vs 126.6 at M = 32, 153 vs 122 at M = 64.
FP8_WEIGHT_ONLY_MAX_M = 32
# gemv.gemv_w8a8 up to this many rows where the GPU has fp8 MMA: off (0). On an H200 it lost to
# W8A16 at one row: Llama-8B layer 81.1 us vs 74.6, B1 3.549 vs 3.192 ms (gemv.py docstring).
FP8_SKINNY_W8A8_MAX_M = 0


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"  # Triton runs on the CPU only through its interpreter


def _dot_args(x: torch.Tensor) -> dict:
    return dict(DOT_FP32=x.dtype == torch.bfloat16 and _interpreted(x),
                DOT_PREC="tf32x3" if x.dtype == torch.float32 else "tf32")


def _tiles(x: torch.Tensor, m: int, n: int, k: int, group: int,
           config: Optional[tuple] = None) -> dict:
    """Tile sizes, split-K and launch shape for an ``[m, k] x [k, n]`` product. ``config``:
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, most split-K) instead of the defaults
    (benchmarks)."""
    max_split = 16
    if config is not None:
        bm, bn, bk, warps, stages, max_split = config
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if _interpreted(x):
        bm, bn, bk, warps, stages = 16, 32, 32, 1, 1
    if group < k:  # a K tile must stay inside one group
        bk = min(bk, group)
    tiles_mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    if not _interpreted(x):
        want = 2 * _num_sms(x.device.index or 0)
        while tiles_mn * split * 2 <= want and k // (bk * split * 2) >= 2 and split < max_split:
            split *= 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                num_stages=stages, grid=(triton.cdiv(m, bm), triton.cdiv(n, bn), split))


def _out(x: torch.Tensor, m: int, n: int, split: int) -> torch.Tensor:
    if split > 1:  # partial sums from several K ranges meet by fp32 atomics
        return torch.zeros(m, n, dtype=torch.float32, device=x.device)
    return torch.empty(m, n, dtype=x.dtype, device=x.device)


def int8_gemm(x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` with the int8 dequantized inside the GEMM."""
    x = x.contiguous()
    m, k = x.shape
    n = w.qweight.shape[0]
    per_channel = w.scales.shape[0] == 1
    t = _tiles(x, m, n, k, k if per_channel else w.group_size)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _out(x, m, n, split)
    _int8_gemm_kernel[grid](
        x, w.qweight, w.scales, bias if bias is not None else x, out, m, n, k,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(0),
        GROUP_SIZE=1 if per_channel else w.group_size, PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None,
        ATOMIC=split > 1, **_dot_args(x), **t)
    return out if split == 1 else out.to(x.dtype)


def int4_gemm(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` with the int4 dequantized inside the GEMM."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.contiguous()
    m, k = x.shape
    n = w.qweight.shape[1]
    t = _tiles(x, m, n, k, w.group_size)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _out(x, m, n, split)
    offsets = w.offsets if w.offsets is not None else w.scales
    _int4_gemm_kernel[grid](
        x, w.qweight, w.scales, offsets, bias if bias is not None else x, out, m, n, k,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), offsets.stride(0), out.stride(0),
        GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point, HAS_OFFSETS=w.offsets is not None,
        HAS_BIAS=bias is not None, ATOMIC=split > 1, **_dot_args(x), **t)
    return out if split == 1 else out.to(x.dtype)


def int4_dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (rows in the permuted input order)."""
    k, n = w.qweight.shape[0] * 8, w.qweight.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    bk, bn = 64, 64
    offsets = w.offsets if w.offsets is not None else w.scales
    _int4_dequant_kernel[(triton.cdiv(k, bk), triton.cdiv(n, bn))](
        w.qweight, w.scales, offsets, out, k, n, w.qweight.stride(0), w.scales.stride(0),
        offsets.stride(0), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
        HAS_OFFSETS=w.offsets is not None, BLOCK_K=bk, BLOCK_N=bn)
    return out


def int8_dequantize(w: Int8Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype``, in one kernel. (torch's ``.to`` then ``*``
    made the whole int8 GEMM take 2x bf16's time at M=2048 on an H200, Llama-8B shapes.)"""
    n, k = w.qweight.shape
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    bn, bk = 32, 128
    per_channel = w.scales.shape[0] == 1
    _int8_dequant_kernel[(triton.cdiv(n, bn), triton.cdiv(k, bk))](
        w.qweight, w.scales, out, n, k, w.qweight.stride(0), w.scales.stride(0),
        GROUP_SIZE=1 << 30 if per_channel else w.group_size, BLOCK_N=bn, BLOCK_K=bk)
    return out


def quantize_fp8_rows(x: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: ``(x_q [M, K], scales [M] fp32)`` in one kernel launch."""
    x = x.contiguous()
    m, k = x.shape
    q = torch.empty(m, k, dtype=fp8_dtype, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    if m:
        block = min(4096, triton.next_power_of_2(k)) if not _interpreted(x) else 64
        _fp8_quant_rows_kernel[(m,)](x, q, scales, k, x.stride(0), q.stride(0),
                                     FP8_MAX=torch.finfo(fp8_dtype).max, BLOCK=block,
                                     num_warps=4 if k >= 1024 else 1)
    return q, scales


def fp8_gemm(xq: torch.Tensor, sx: torch.Tensor, w: Fp8Weight, out_dtype: torch.dtype,
             bias=None) -> torch.Tensor:
    """The Triton W8A8 GEMM: ``(xq @ w.qweight.T) * sx[:, None] * w.scales[None, :]``."""
    m, k = xq.shape
    n = w.qweight.shape[0]
    t = _tiles(xq, m, n, k, k)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = torch.zeros(m, n, dtype=torch.float32, device=xq.device) if split > 1 else \
        torch.empty(m, n, dtype=out_dtype, device=xq.device)
    _fp8_gemm_kernel[grid](
        xq, sx, w.qweight, w.scales, bias if bias is not None else sx, out, m, n, k,
        xq.stride(0), w.qweight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        ATOMIC=split > 1, DOT_FP32=_interpreted(xq), **t)
    return out if split == 1 else out.to(out_dtype)


def _w_ptx(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Widen e4m3 weights by bit moves (``e4m3_to_16bit``): NVIDIA, e4m3fn, 16-bit x."""
    return (not _interpreted(x) and torch.version.hip is None
            and w.dtype == torch.float8_e4m3fn and x.dtype in (torch.bfloat16, torch.float16))


def _fp8_w8a16_config(m: int) -> tuple:
    """Tiles of the W8A16 fp8 GEMM by rows (H200 sweep, same benchmark): BLOCK_K 256 wins
    where Triton specializes M (M = 1, or M a multiple of 16), 128 for the other M <= 16."""
    if m > 16:
        return (32, 64, 128, 4, 4, 16)
    if m == 1 or m % 16 == 0:
        return (16, 64, 256, 4, 3, 16)
    return (16, 64, 128, 4, 4, 16)


def fp8_weight_only_gemm(x: torch.Tensor, w: Fp8Weight, bias=None,
                         config: Optional[tuple] = None) -> torch.Tensor:
    """W8A16: ``x [M, K] @ (w.qweight * w.scales[:, None]).T (+ bias)``, x unquantized.
    ``config``: tiles instead of ``_fp8_w8a16_config``'s (benchmarks)."""
    return fp8_w8a16(x, w.qweight, w.scales, bias, config)


def _gemv_fp8_faster(m: int, n: int, k: int) -> bool:
    """Where ``gemv.gemv_fp8`` beats ``fp8_w8a16_tiled`` (H200, CUDA graph, Llama-3.1-8B shapes
    at TP 1 and 2, benchmarks/kernels/gemv_bench.py): at one row wherever N < 8192, where the
    tiled kernel's 64-row tiles cannot fill the GPU and it splits K (zeroed fp32 buffer,
    atomics, a cast); at two rows only while K <= 4096 too. Elsewhere, large N (gate_up, the LM
    head) and M >= 3, the tiled kernel streams the weight faster. M=1 layer (qkv, o, gate_up,
    down): 74.5 us against 81.9 with the tiled kernel alone."""
    return n < 8192 and (m == 1 or (m == 2 and k <= 4096))


FP8_GEMV_X2 = True  # default of TESSELLM_FP8_GEMV_X2


def _use_gemv_x2(x: torch.Tensor, qweight: torch.Tensor) -> bool:
    """One bf16 row against e4m3fn, compiled on NVIDIA sm90+ (``mul.rn.bf16x2``), K in words."""
    on = envs.fp8_gemv_x2()
    return ((FP8_GEMV_X2 if on is None else on) and x.shape[0] == 1
            and x.dtype == torch.bfloat16 and qweight.dtype == torch.float8_e4m3fn
            and x.is_cuda and torch.version.hip is None and qweight.shape[1] % 4 == 0
            and qweight.stride(0) % 4 == 0 and qweight.data_ptr() % 4 == 0
            and torch.cuda.get_device_capability(x.device)[0] >= 9)


def fp8_w8a16(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None,
              config: Optional[tuple] = None) -> torch.Tensor:
    """``fp8_weight_only_gemm`` on bare tensors: ``qweight`` e4m3fn or e4m3fnuz ``[N, K]``,
    ``scales`` float32 ``[N]`` (the rocm backend's fp8 layers hold these). The skinny GEMM
    (``gemv.gemv_fp8``) where it is faster, else the tiled kernel; ``config`` (the tiled
    kernel's tiles, benchmarks) forces the tiled kernel. The choice is by shape alone, so each
    captured graph takes one side."""
    if config is None and _use_gemv_x2(x, qweight):
        from tessellm.backends.cuda.gemv import gemv_fp8_x2  # gemv imports this module

        return gemv_fp8_x2(x, qweight, scales, bias)
    if config is None and _gemv_fp8_faster(x.shape[0], qweight.shape[0], qweight.shape[1]):
        from tessellm.backends.cuda.gemv import gemv_fp8  # gemv imports this module

        return gemv_fp8(x, qweight, scales, bias)
    return fp8_w8a16_tiled(x, qweight, scales, bias, config)


def fp8_w8a16_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None,
                    config: Optional[tuple] = None) -> torch.Tensor:
    """``fp8_w8a16`` by ``_fp8_w8a16_gemm_kernel`` (tiles, split-K by atomics); ``config``: its
    tiles instead of ``_fp8_w8a16_config``'s (benchmarks)."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    t = _tiles(x, m, n, k, k, config or _fp8_w8a16_config(m))
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _out(x, m, n, split)
    _fp8_w8a16_gemm_kernel[grid](
        x, qweight, scales, bias if bias is not None else x, out, m, n, k,
        x.stride(0), qweight.stride(0), out.stride(0), HAS_BIAS=bias is not None,
        ATOMIC=split > 1, W_PTX=_w_ptx(x, qweight), **_dot_args(x), **t)
    return out if split == 1 else out.to(x.dtype)


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


class TritonQuantOps:
    """``QuantOps`` for the cuda backend (and any Triton GPU). ``use_scaled_mm``: False forces
    the Triton fp8 GEMM (tests, GPUs without cuBLASLt fp8). ``fp8_weight_only_max_m``: fp8
    GEMMs of at most this many rows run weight-only (W8A16, ``fp8_weight_only_gemm``); 0 never.
    ``fp8_skinny_w8a8_max_m``: up to this many rows take ``gemv.gemv_w8a8`` instead, where the
    GPU has fp8 MMA (default ``FP8_SKINNY_W8A8_MAX_M``: 0, never; slower on an H200).
    """

    name = "triton"
    schemes = frozenset({"int8", "fp8", "awq", "gptq", "gguf"})

    def __init__(self, use_scaled_mm: bool = True, dequant_min_m: int = DEQUANT_MIN_M,
                 fp8_weight_only_max_m: int = FP8_WEIGHT_ONLY_MAX_M,
                 fp8_skinny_w8a8_max_m: Optional[int] = None):
        self.use_scaled_mm = use_scaled_mm
        self.dequant_min_m = dequant_min_m
        self.fp8_weight_only_max_m = fp8_weight_only_max_m
        self.fp8_skinny_w8a8_max_m = (FP8_SKINNY_W8A8_MAX_M if fp8_skinny_w8a8_max_m is None
                                      else fp8_skinny_w8a8_max_m)  # None: read when built

    def int8_mm(self, x, w: Int8Weight, bias=None):
        if x.shape[0] >= self.dequant_min_m and not _interpreted(x):
            return F.linear(x, int8_dequantize(w, x.dtype), bias)
        return int8_gemm(x, w, bias)

    def int4_mm(self, x, w: Int4Weight, bias=None):
        if x.shape[0] >= self.dequant_min_m and not _interpreted(x):
            if w.perm is not None:
                x = x.index_select(-1, w.perm)
            return F.linear(x, int4_dequantize(w, x.dtype), bias)
        return int4_gemm(x, w, bias)

    def fp8_mm(self, x, w: Fp8Weight, bias=None):
        """Decode: W8A16 up to ``fp8_weight_only_max_m`` rows (or, if asked, up to
        ``fp8_skinny_w8a8_max_m`` rows, W8A8 through ``gemv.gemv_w8a8`` where the GPU has fp8
        MMA). Above, W8A8 (x quantized by its own kernel, then ``torch._scaled_mm`` or the
        Triton GEMM). x's shape is fixed per captured graph, so a graph always takes one side."""
        m = x.shape[0]
        if m <= self.fp8_skinny_w8a8_max_m:
            from tessellm.backends.cuda import gemv  # gemv imports this module

            if gemv.w8a8_native(x, w.qweight):
                return gemv.gemv_w8a8(x, w.qweight, w.scales, bias)
        if m <= self.fp8_weight_only_max_m:
            return fp8_weight_only_gemm(x, w, bias)
        xq, sx = quantize_fp8_rows(x, w.qweight.dtype)
        if self.use_scaled_mm and _scaled_mm_ok(x, w):
            out = torch._scaled_mm(xq, w.qweight.t(), scale_a=sx[:, None], scale_b=w.scales[None, :],
                                   out_dtype=torch.bfloat16)
            out = out.to(x.dtype)
            return out if bias is None else out.add_(bias)
        return fp8_gemm(xq, sx, w, x.dtype, bias)
