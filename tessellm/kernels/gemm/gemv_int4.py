"""Decode GEMV on dense AWQ / GPTQ int4 weights (W4A16), 1 to ``INT4_GEMV_MAX_M`` rows.

``y[M, N] = x[M, K] @ dequant(w).T`` for a ``packed.Int4Weight`` (q int32 ``[K/8, N]``, 8 codes
a word along K, low nibble first; scales ``[G, N]``, and either a constant ``zero_point`` or
float offsets ``[G, N]``: ``w[n, k] = (q - zero_point) * scale + offset``). No tensor cores:
at a few rows the product is bound by the weight read (half a byte a weight), so each program
streams ``BLOCK_N`` columns of words over its K range::

    words   [BKW, BLOCK_N] int32        one load a word (16 words, four 16-byte loads a thread)
    q_j     (words >> 4j) & 15          nibble j, unpacked in registers (j = 0..7), made
                                        float32 by bits (``_nibble_f32``: no I2F)
    x_j     x[m, 8 w + j]               [BKW], broadcast along N
    acc_m  += s * (sum_j q_j x_j  -  zero_point * sum_j x_j)   [BKW, BLOCK_N] per row m
              (offsets: s * sum_j q_j x_j + offset * sum_j x_j)
    y[m]    = sum over the word rows of acc_m                  once, at the end

Every tile stays in the words' register layout (no layout conversion in the loop: a
``[BKW, 8, BLOCK_N]`` tile with x loaded ``[BKW, 8, 1]`` made Triton spread the 8 nibbles over
threads and keep all 64 columns in each, 254 registers at one row), a scale (and an offset) is
one load a word row, and the per-code work is a shift, a LOP3, an FADD and a float32 FMA per
row. The weights are not rounded to x's dtype one by one as the reference's dequantized
matrix is: the result equals the reference to float32 reassociation (float32 x) or to the
rounding of the weights (16-bit x). K is split over ``SPLIT_K`` programs (partial planes,
``common._split_sum``, deterministic, as ``gemv.py``) until the grid has about
``PROGRAMS_PER_SM`` programs a multiprocessor. PDL hooks as the other decode kernels
(``kernels/pdl.py``).

Not timed yet (benchmarks/int4dense_device.sh times it against the tiled kernel and bf16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (_gemv_rows_epilogue, _interpreted, _num_sms,
                                          _split_out, _split_stride, _split_sum)
from tessellm.kernels.pdl import pdl_args, pdl_start
from tessellm.quantization.packed import Int4Weight

# Rows up to which TritonQuantOps.int4_mm takes this GEMV (a compile per row count; each row
# adds an accumulator tile and an FMA a code). Above, the tiled GEMM (``weight_only``).
INT4_GEMV_MAX_M = 4
PROGRAMS_PER_SM = 8  # split K until the grid has about this many programs a multiprocessor


@triton.jit
def _nibble_f32(words, j: tl.constexpr):
    """Nibble ``j`` of each word as float32, exactly, without a conversion instruction: its
    bits under float32's exponent of 2^23 read as the float 2^23 + q, less 2^23 (a shift, one
    LOP3 and an FADD, all full rate; Triton's ``.to`` compiles to an I2F, quarter rate on
    Hopper, which alone would cost as much time as reading the weight)."""
    bits = ((words >> (4 * j)) & 0xF) | 0x4B000000
    return bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _row_step(acc, words, s, off, x_row, rkw, kw_hi, ZERO_POINT: tl.constexpr,
              HAS_OFFSETS: tl.constexpr, EVEN_K: tl.constexpr):
    """acc ``[BKW, BN]`` += one row's products with the step's words ``[BKW, BN]``: nibble j of
    each word meets input ``8 w + j`` of x (loaded ``[BKW]``, broadcast along N), so every
    tile stays in the words' register layout."""
    qx = tl.zeros(words.shape, dtype=tl.float32)
    xw = tl.zeros((words.shape[0],), dtype=tl.float32)
    for j in tl.static_range(8):
        if EVEN_K:
            x = tl.load(x_row + rkw * 8 + j).to(tl.float32)
        else:
            x = tl.load(x_row + rkw * 8 + j, mask=rkw < kw_hi, other=0.0).to(tl.float32)
        qx += _nibble_f32(words, j) * x[:, None]
        xw += x
    if HAS_OFFSETS:
        return acc + s * qx + off * xw[:, None]
    return acc + s * (qx - ZERO_POINT * xw[:, None])


@triton.jit
def _gemv_int4_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, N, KW,
                      stride_xm, stride_qk, stride_sg, stride_og, stride_om, stride_split,
                      GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                      HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                      SPLIT_K, BLOCK_N: tl.constexpr, BKW: tl.constexpr, EVEN_K: tl.constexpr,
                      EVEN_N: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid ``(N / BLOCK_N, SPLIT_K)``; ``KW`` = K / 8 words; ``ROWS`` = M (1..4). EVEN_K: every
    program's word range is whole ``BKW`` steps inside KW (no K mask); EVEN_N: N % BLOCK_N == 0
    (no N mask)."""
    pdl_start(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N),
                           BLOCK_N)
    span = tl.cdiv(tl.cdiv(KW, BKW), SPLIT_K) * BKW
    kw_lo = pid_k * span
    kw_hi = tl.minimum(kw_lo + span, KW)
    acc0 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    acc1 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    acc3 = tl.zeros((BKW, BLOCK_N), dtype=tl.float32)
    n_ok = rn[None, :] < N
    for kw0 in range(kw_lo, kw_hi, BKW):
        rkw = kw0 + tl.arange(0, BKW)
        g = (rkw * 8 // GROUP_SIZE)[:, None]
        w_ptrs = q_ptr + rkw[:, None].to(tl.int64) * stride_qk + rn[None, :]
        if EVEN_K and EVEN_N:
            words = tl.load(w_ptrs)
            s = tl.load(s_ptr + g * stride_sg + rn[None, :]).to(tl.float32)
            off = s  # (unused without offsets)
            if HAS_OFFSETS:
                off = tl.load(o_ptr + g * stride_og + rn[None, :]).to(tl.float32)
        else:
            ok = (rkw[:, None] < kw_hi) & n_ok
            words = tl.load(w_ptrs, mask=ok, other=0)
            s = tl.load(s_ptr + g * stride_sg + rn[None, :], mask=ok, other=0.0).to(tl.float32)
            off = s
            if HAS_OFFSETS:
                off = tl.load(o_ptr + g * stride_og + rn[None, :], mask=ok,
                              other=0.0).to(tl.float32)
        acc0 = _row_step(acc0, words, s, off, x_ptr, rkw, kw_hi, ZERO_POINT, HAS_OFFSETS, EVEN_K)
        if ROWS > 1:
            acc1 = _row_step(acc1, words, s, off, x_ptr + stride_xm, rkw, kw_hi, ZERO_POINT,
                             HAS_OFFSETS, EVEN_K)
        if ROWS > 2:
            acc2 = _row_step(acc2, words, s, off, x_ptr + 2 * stride_xm, rkw, kw_hi, ZERO_POINT,
                             HAS_OFFSETS, EVEN_K)
        if ROWS > 3:
            acc3 = _row_step(acc3, words, s, off, x_ptr + 3 * stride_xm, rkw, kw_hi, ZERO_POINT,
                             HAS_OFFSETS, EVEN_K)
    _gemv_rows_epilogue(acc0, acc1, acc2, acc3, out_ptr, bias_ptr, rn, N, stride_om,
                        stride_split, pid_k, HAS_BIAS, ROWS, AXIS=0)


def gemv_int4_config(m: int, n: int, k: int, interpreted: bool, num_sms: int = 132) -> dict:
    """Tiles and split-K by shape alone (graph-capture safe): 64 columns a program (8 threads
    of 8 words across N), ``BKW`` word rows a step with 4 warps (32 at 1-2 rows: 16 words a
    thread; 16 at 3-4 rows, where each row adds an accumulator tile), K split in powers of two
    while the grid has under ``PROGRAMS_PER_SM`` programs a multiprocessor and each split keeps
    at least 4 steps. sm90 ptxas (benchmarks/kernels/aot_int4_dense.py, BKW 16): 48 registers
    at 1 row, 125-158 at 4, no spills. Not swept on a GPU yet. Triton's interpreter: 64
    columns and 16 words a step, as few programs and steps as a tiny model allows (its cost is
    per nested jit call: ``_row_step``'s 8 nibbles a row a step a program), still several
    programs, short tiles and steps at tests/kernels/test_gemv_int4.py's shapes."""
    bn, bkw, warps = (64, 16, 1) if interpreted else (64, 32 if m <= 2 else 16, 4)
    kw = k // 8
    bkw = min(bkw, triton.next_power_of_2(kw))
    tiles_n = triton.cdiv(n, bn)
    steps = triton.cdiv(kw, bkw)
    split = 1
    if not interpreted:
        while (tiles_n * split * 2 <= PROGRAMS_PER_SM * num_sms and steps // (split * 2) >= 4
               and split < 16):
            split *= 2
    even_k = kw % bkw == 0 and steps % split == 0  # every program: whole steps inside K
    return dict(BLOCK_N=bn, BKW=bkw, SPLIT_K=split, EVEN_K=even_k, EVEN_N=n % bn == 0,
                num_warps=warps, grid=(tiles_n, split))


def gemv_int4(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` for M <= ``INT4_GEMV_MAX_M`` (1..4) rows."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.contiguous()
    m, k = x.shape
    n = w.qweight.shape[1]
    if not 1 <= m <= INT4_GEMV_MAX_M:
        raise ValueError(f"gemv_int4 takes 1 to {INT4_GEMV_MAX_M} rows, got {m}; use "
                         "weight_only.int4_gemm for more.")
    interp = _interpreted(x)
    t = gemv_int4_config(m, n, k, interp, 1 if interp else _num_sms(x.device.index or 0))
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    offsets = w.offsets if w.offsets is not None else w.scales
    _gemv_int4_kernel[grid](
        x, w.qweight, w.scales, offsets, bias if bias is not None else x, out, n, k // 8,
        x.stride(0), w.qweight.stride(0), w.scales.stride(0), offsets.stride(0), out.stride(-2),
        _split_stride(out), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
        HAS_OFFSETS=w.offsets is not None, HAS_BIAS=bias is not None, ROWS=m,
        **t, **pdl_args(x.device))
    return _split_sum(out, x.dtype)
