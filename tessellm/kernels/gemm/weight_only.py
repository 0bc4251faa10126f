"""Quantized GEMMs in Triton (dequantize inside the GEMM): the cuda backend's ``QuantOps``.

``y[M, N] = x[M, K] @ W.T`` with W packed (see ``tessellm/quantization/packed.py``). One program
computes a ``[BLOCK_M, BLOCK_N]`` tile of y over a K range; grouped scales are applied per K
tile, so a tile never straddles a group (``BLOCK_K`` divides the group size)::

    for k0 in my K range, step BLOCK_K:            g = k0 // GROUP
        part = dot(x[:, k0:k0+BK], codes[k0:k0+BK, :] - zero_point)   (exact small integers)
        acc += part * scale[g, :]  (+ rowsum(x[:, k0:k0+BK]) * offset[g, :] for int4 offsets)

Small M (decode) is memory-bound: tiles are 16 rows and K is split over ``SPLIT_K`` programs
(each range's partial product in its own plane, summed after: deterministic, ``common.py``)
until the grid fills the GPU. Large M (prefill) is compute-bound: the weight is
dequantized once to x's dtype and cuBLAS does the GEMM (``DEQUANT_MIN_M``).

fp8: up to ``FP8_WEIGHT_ONLY_MAX_M`` rows (decode), W8A16: ``_w8a16_gemm_kernel`` (W_FP8) reads
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

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.gemm.common import (
    _dot_args,
    _epilogue,
    _interpreted,
    _split_out,
    _split_stride,
    _split_sum,
    _tile_ranges,
    _tiles,
)
from tessellm.kernels.gemm.fp8_codes import e4m3_to_16bit
from tessellm.quantization.packed import Fp8Weight, Int4Weight, Int8Weight


@triton.jit
def _w8a16_gemm_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K,
                       stride_xm, stride_wn, stride_sg, stride_om, stride_split,
                       GROUP_SIZE: tl.constexpr, PER_CHANNEL: tl.constexpr,
                       HAS_BIAS: tl.constexpr, SPLIT_K,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       W_FP8: tl.constexpr, W_PTX: tl.constexpr, DOT_FP32: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """One 8-bit weight ``[N, K]`` times x in the model dtype, the weight widened in the tile.

    W_FP8 False: int8 codes, scales ``[G, N]`` (PER_CHANNEL: G = 1, applied once at the end,
    else per K tile by group). W_FP8 True: e4m3 codes with per-channel float32 scales ``[N]``
    (PER_CHANNEL must be True); W_PTX widens them with ``e4m3_to_16bit`` (x bf16 or fp16,
    NVIDIA), else ``w.to(x.dtype)``. Every difference is a constexpr branch, so each weight
    kind compiles to the code its own kernel had before the two were merged.
    """
    pid_k, rm, rn, k_lo, k_hi = _tile_ranges(K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    w_col = w_ptr + rn[None, :].to(tl.int64) * stride_wn
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        if W_FP8:
            w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
        else:
            w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0)
        if DOT_FP32:
            x = x.to(tl.float32)
        if W_PTX:
            w = e4m3_to_16bit(w, x.dtype == tl.bfloat16)
        part = tl.dot(x, w.to(x.dtype), input_precision=DOT_PREC)
        if PER_CHANNEL:
            acc += part
        else:
            s = tl.load(s_ptr + (k0 // GROUP_SIZE) * stride_sg + rn, mask=rn < N, other=0.0)
            acc += part * s.to(tl.float32)[None, :]
    if PER_CHANNEL:
        acc *= tl.load(s_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k, HAS_BIAS)


@triton.jit
def _int4_codes(q_ptr, k0, k_hi, rn, N, stride_qk, BLOCK_K: tl.constexpr,
                BLOCK_N: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` int4 codes of inputs ``k0 ..`` (``k0`` a multiple of
    ``BLOCK_K``, inputs at or past ``k_hi`` zero) and columns ``rn``, from q int32 ``[K/8, N]``:
    each packed word is loaded once (a ``[BLOCK_K / 8, BLOCK_N]`` tile, contiguous along N) and
    its 8 nibbles are unpacked in registers; row ``8 w + j`` of the result is nibble j of word
    row w. (Loading the word once per code, as this kernel first did, issued 8 loads a word.)"""
    rkw = tl.max_contiguous(tl.multiple_of(k0 // 8 + tl.arange(0, BLOCK_K // 8), BLOCK_K // 8),
                            BLOCK_K // 8)
    words = tl.load(q_ptr + rkw[:, None].to(tl.int64) * stride_qk + rn[None, :],
                    mask=(rkw[:, None] < k_hi // 8) & (rn[None, :] < N), other=0)
    nib = (tl.arange(0, 8) * 4)[None, :, None]
    codes = (words[:, None, :] >> nib) & 0xF  # [BLOCK_K / 8, 8, BLOCK_N]
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _codes_to_16bit(codes, ZERO_POINT: tl.constexpr, BF16: tl.constexpr):
    """int4 codes (int32, 0..15) minus ``ZERO_POINT`` as bf16 (BF16) or fp16, exactly, by bits:
    the code under the exponent of 128 (bf16, 7 mantissa bits) or 1024 (fp16, 10) reads as
    128 + q / 1024 + q, less (128 + ZERO_POINT) / (1024 + ZERO_POINT). Integer ops and one
    16-bit subtraction instead of Triton's ``.to`` (an I2F per code, quarter rate on Hopper)."""
    if BF16:
        w = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True) - (128.0 + ZERO_POINT)
    else:
        w = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True) - (1024.0 + ZERO_POINT)
    return w


@triton.jit
def _int4_gemm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K,
                      stride_xm, stride_qk, stride_sg, stride_og, stride_om, stride_split,
                      GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                      HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                      W16: tl.constexpr):
    """q int32 ``[K/8, N]`` (8 codes per word along K); scales/offsets ``[G, N]``. K is a
    multiple of 8 (whole words); ``BLOCK_K`` a multiple of 8 dividing the group. W16: 1 (bf16
    x) or 2 (fp16 x): codes widened by bits (``_codes_to_16bit``); 0: by ``.to``."""
    pid_k, rm, rn, k_lo, k_hi = _tile_ranges(K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        codes = _int4_codes(q_ptr, k0, k_hi, rn, N, stride_qk, BLOCK_K, BLOCK_N)
        if DOT_FP32:
            x = x.to(tl.float32)
        if W16 > 0:
            w = _codes_to_16bit(codes, ZERO_POINT, W16 == 1)
        else:
            w = (codes - ZERO_POINT).to(x.dtype)
        part = tl.dot(x, w, input_precision=DOT_PREC)
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += part * s[None, :]
        if HAS_OFFSETS:
            off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * off[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k, HAS_BIAS)


@triton.jit
def _int4_dequant_kernel(q_ptr, s_ptr, o_ptr, out_ptr, K, N, stride_qk, stride_sg, stride_og,
                         GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                         HAS_OFFSETS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """out ``[N, K]`` (x's dtype) = the dense weight, for the large-M cuBLAS path (each word
    loaded once, ``_int4_codes``; ``BLOCK_K`` divides the group)."""
    k0 = tl.program_id(0) * BLOCK_K
    rk = k0 + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rk[:, None] < K) & (rn[None, :] < N)
    codes = _int4_codes(q_ptr, k0, K, rn, N, stride_qk, BLOCK_K, BLOCK_N)
    g = k0 // GROUP_SIZE
    # the code under float32's exponent of 2^23 reads as 2^23 + q: exact, and no I2F per code
    w = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (8388608.0 + ZERO_POINT)
    w *= tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
    if HAS_OFFSETS:
        w += tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)[None, :]
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


DEQUANT_MIN_M = 512  # from this many rows on, dequantize once and let cuBLAS multiply


def int8_gemm(x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` with the int8 dequantized inside the GEMM."""
    x = x.contiguous()
    m, k = x.shape
    n = w.qweight.shape[0]
    per_channel = w.scales.shape[0] == 1
    t = _tiles(x, m, n, k, k if per_channel else w.group_size)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    _w8a16_gemm_kernel[grid](
        x, w.qweight, w.scales, bias if bias is not None else x, out, m, n, k,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), out.stride(-2), _split_stride(out),
        GROUP_SIZE=1 if per_channel else w.group_size, PER_CHANNEL=per_channel,
        HAS_BIAS=bias is not None, W_FP8=False, W_PTX=False, **_dot_args(x), **t)
    return _split_sum(out, x.dtype)


def int4_gemm(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` with the int4 dequantized inside the GEMM."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.contiguous()
    m, k = x.shape
    n = w.qweight.shape[1]
    t = _tiles(x, m, n, k, w.group_size)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    offsets = w.offsets if w.offsets is not None else w.scales
    _int4_gemm_kernel[grid](
        x, w.qweight, w.scales, offsets, bias if bias is not None else x, out, m, n, k,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), offsets.stride(0), out.stride(-2),
        _split_stride(out), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
        HAS_OFFSETS=w.offsets is not None, HAS_BIAS=bias is not None, W16=_w16(x), **_dot_args(x),
        **t)
    return _split_sum(out, x.dtype)


def _w16(x: torch.Tensor) -> int:
    """``_int4_gemm_kernel``'s W16: bf16 x on a GPU (the interpreter's bf16 dots run in
    float32), fp16 x anywhere; else 0."""
    if x.dtype == torch.bfloat16 and not _interpreted(x):
        return 1
    return 2 if x.dtype == torch.float16 else 0


def int4_dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` (rows in the permuted input order)."""
    k, n = w.qweight.shape[0] * 8, w.qweight.shape[1]
    out = torch.empty(n, k, dtype=dtype, device=w.qweight.device)
    group = w.group_size  # a K block inside one group (or the one group, per channel)
    bk, bn = (64 if group % 64 == 0 or group >= k else group & -group), 64
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
    partial planes, a sum); at two rows only while K <= 4096 too. Elsewhere, large N (gate_up, the LM
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
        from tessellm.kernels.gemm.gemv_x2 import gemv_fp8_x2

        return gemv_fp8_x2(x, qweight, scales, bias)
    if config is None and _gemv_fp8_faster(x.shape[0], qweight.shape[0], qweight.shape[1]):
        from tessellm.kernels.gemm.gemv import gemv_fp8

        return gemv_fp8(x, qweight, scales, bias)
    return fp8_w8a16_tiled(x, qweight, scales, bias, config)


def fp8_w8a16_tiled(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, bias=None,
                    config: Optional[tuple] = None) -> torch.Tensor:
    """``fp8_w8a16`` by ``_w8a16_gemm_kernel`` (W_FP8) (tiles, split-K partial planes); ``config``: its
    tiles instead of ``_fp8_w8a16_config``'s (benchmarks)."""
    x = x.contiguous()
    m, k = x.shape
    n = qweight.shape[0]
    t = _tiles(x, m, n, k, k, config or _fp8_w8a16_config(m))
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    _w8a16_gemm_kernel[grid](
        x, qweight, scales, bias if bias is not None else x, out, m, n, k,
        x.stride(0), qweight.stride(0), 0, out.stride(-2), _split_stride(out), GROUP_SIZE=1,
        PER_CHANNEL=True, HAS_BIAS=bias is not None, W_FP8=True, W_PTX=_w_ptx(x, qweight),
        **_dot_args(x), **t)
    return _split_sum(out, x.dtype)
