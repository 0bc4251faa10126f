"""Skinny GEMMs for decode: ``y[M, N] = x[M, K] @ W[N, K].T`` with M = 1..32 rows.

At decode the weight is read once per step and the rows of x are few, so the product is bound
by the weight read: one pass over ``N * K`` weight bytes at memory bandwidth is the floor. W is
bf16/fp16 (``gemv``) or e4m3 with one float32 scale per output channel (``gemv_fp8``, W8A16:
``y = (x @ codes.T) * scale``). Both weight kinds share two kernels (``W_FP8``); the host picks
one and its tiles from (M, N, K) with ``gemv_config``:

* ``_gemv_fma_kernel`` (M <= 4): each program reads a ``[BLOCK_N, BLOCK_K]`` weight tile per
  step, 16 bytes a thread along K, widens it to float32 and multiplies it with every row of x
  (one float32 accumulator tile per row, up to 4); no tensor cores, no shared memory::

      acc_m[n, k'] += x[m, k0 + k'] * W[n, k0 + k']     k' < BLOCK_K, k0 over my K range
      y[m, n] = sum_k' acc_m[n, k'] (* scale[n]) (+ bias[n])

  With ``chunk`` the tile is ``[BLOCK_N, BLOCK_K / chunk, chunk]`` and each thread sums its
  ``chunk`` products every step, so the accumulator (registers) shrinks ``chunk`` times.
  With ``f32_bits`` e4m3 codes become float32 by 3 integer instructions (exact, scaled by
  2^-120, undone in the epilogue) instead of ``e4m3_to_16bit`` and a widening.

* ``_gemv_dot_kernel`` (any M, BLOCK_M >= 16): ``acc[BLOCK_N, BLOCK_M] += dot(W tile, x
  tile.T)``: weight rows in the tensor cores' M slot, x's few rows in the N slot.

SiLU-and-mul in the epilogue (``gemv_silu_and_mul``, ``SILU_FOLD``; the engine's MLP at 1-2
rows unless ``TESSELLM_SILU_FOLD=0``, one launch a layer fewer; on by default since timed, ``envs.silu_fold``):
W is the stacked ``[gate; up]`` ``[2I, K]`` and a program's BLOCK_N rows are BLOCK_N / 2 pairs
(gate row j, up row j + I), read by the same K loop; the epilogue rounds both sums to x's dtype
as the GEMV stores them and runs ``activation.silu_mul``, so out ``[M, I]`` is bitwise the GEMV
then ``silu_and_mul``. No split-K there (the epilogue needs whole sums); ``gemv_x2`` folds its
e4m3 kernel the same way.

The residual-add RMSNorm after the product (``gemv_then_add_rms_norm``, ``NORM_EPI``; the
decoder's o_proj / down_proj at one row under ``TESSELLM_GEMV_NORM_EPILOGUE=1``): the last
program to finish normalizes the whole output row (``norm_epilogue.py``), bitwise the GEMV then
``fused_add_rms_norm``; no split-K there either.

Invariant: every program reads whole weight rows of its ``BLOCK_N`` outputs over its K range.
Rows past N are clamped to row N-1 (read again, never stored), so weight loads carry no N mask;
K needs a mask only when ``BLOCK_K * SPLIT_K`` does not divide K (``EVEN_K``). With
``SPLIT_K`` > 1 each K range stores its float32 partial sums in its own plane of a
``[split, M, N]`` buffer, summed over the planes and cast after (``common._split_sum``: the
same bits every call, where float32 atomics would add in the order the programs finish): two
extra kernels, so the tables split only where N alone cannot give every SM a program. Under
``TESSELLM_GEMV_SPLIT_LAST`` the FMA kernel's planes are added instead by each N tile's last
program, in the same fixed order, inside the launch (``split_last.py``; ``GemvConfig.split_last``,
``gemv_x2_table.BF16_SPLIT_TABLE`` at one 16-bit row).

No host-device sync, no autotuning: configs are a pure function of (M, N, K, weight kind), so
the launch is safe inside CUDA graph capture. On the CPU the kernels run in Triton's
interpreter (tests); there, dots run in float32 and no inline PTX runs.

H200 (gemv_bench.py, CUDA graph, weights rotated past the L2): at M = 1 the FMA kernel reads
bf16 weights at 4.3-4.6 TB/s on large matrices (about 2.5 us more than that on each small one)
and beats cuBLAS on every Llama-8B shape (by 1% on gate_up, 3% on the LM head, 10-33% on the
smaller ones); at M = 2 only where N < 8192; from M = 4 on cuBLAS is faster. e4m3 reaches only
3.2-3.4 TB/s on large matrices (about 5 instructions a code: it is not bound by the read), so
``weight_only.fp8_w8a16`` uses it only where the tiled kernel is slower.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.gemm.common import (_capability, _interpreted, _num_sms, _split_out,
                                          _split_stride, _split_sum)
from tessellm.kernels.activation import silu_mul
from tessellm.kernels.gemm.fp8_codes import e4m3_to_16bit
from tessellm.kernels.gemm.gemv_x2_table import BF16_SPLIT_TABLE
from tessellm.kernels.gemm.norm_epilogue import (NORM_EPILOGUE_MAX_N, NormEpilogue,
                                                  epilogue_args, make_epilogue, norm_epilogue,
                                                  norm_epilogue_applies)
from tessellm.kernels.gemm.split_last import (split_last_args, split_last_combine,
                                              split_last_enabled, tile_counters)
from tessellm.kernels.gemm.norm_fold import (FOLD_IN, FOLD_OUT, NORM_LAST, consumer_args,
                                             fold_out, fold_out_residual,
                                             fold_out_weight, fold_rstd, producer_args)
from tessellm.kernels.pdl import (pdl_args, pdl_enabled, pdl_launch, pdl_start, pdl_wait,
                                  prefetch_l2)

GEMV_MAX_M = 32  # the config tables cover up to this many rows
# Triton's interpreter (tests on the CPU): FMA tiles of at least this many outputs when no
# config is given. Its cost is per program (each nested jit call re-patches triton.language),
# and the GPU's 2-output tiles made a tiny model's decode GEMV 32-128 programs; the sums per
# output are the same whatever the tile.
INTERPRETED_MIN_BLOCK_N = 16


@dataclass(frozen=True)
class GemvConfig:
    """Launch shape of the skinny GEMM; chosen per (M, N, K) by ``gemv_config``."""

    block_n: int  # weight rows (outputs) per program
    block_k: int  # K elements per loop step and program (a power of two)
    num_warps: int
    stages: int  # software-pipelining depth of the K loop (1: plain loads)
    split_k: int = 1  # programs along K; > 1: a float32 plane each, summed, then a cast
    dot: bool = False  # tensor-core dot (BLOCK_M >= 16 rows of x) instead of FMAs
    chunk: int = 0  # FMA: sum each thread's 16-byte run of K every step (0: at the end)
    f32_bits: bool = False  # FMA, e4m3 on NVIDIA: decode to float32 by bit moves (x 2^-120)
    split_last: bool = False  # FMA, split_k > 1: combined in the launch (``split_last.py``)


@triton.jit
def _widen(w, x_dtype: tl.constexpr, W_FP8: tl.constexpr, W_PTX: tl.constexpr,
           TO_F32: tl.constexpr, PTX: tl.constexpr):
    """The weight tile in float32 (TO_F32) or in x's dtype, exactly. For a dot the bit moves
    are pinned to the loaded tile (16 contiguous bytes a thread); left free, Triton moves them
    into the dot operand layout, where they take twice the instructions (sm_90 SASS)."""
    if W_FP8 and W_PTX:
        w = e4m3_to_16bit(w, x_dtype == tl.bfloat16, TO_F32)
    if TO_F32:
        w = _to_f32(w, PTX)
    else:
        w = w.to(x_dtype)
    return w


@triton.jit
def _e4m3_to_f32_scaled(w):
    """e4m3fn -> float32 times 2^-120, exact (subnormals too), 3 integer instructions a value:
    the byte b goes to the top of a word, an arithmetic shift by 4 puts its 7 low bits into
    float32's exponent/mantissa fields (the sign stays in bit 31), a mask clears the rest."""
    return tl.inline_asm_elementwise(
        ("{ .reg .b32 t0, t1, t2, t3;\n"
         "prmt.b32 t0, $4, 0, 0x0444;\n"
         "prmt.b32 t1, $4, 0, 0x1444;\n"
         "prmt.b32 t2, $4, 0, 0x2444;\n"
         "shr.s32 t0, t0, 4;\n"
         "shr.s32 t1, t1, 4;\n"
         "shr.s32 t2, t2, 4;\n"
         "shr.s32 t3, $4, 4;\n"
         "and.b32 $0, t0, 0x87F00000;\n"
         "and.b32 $1, t1, 0x87F00000;\n"
         "and.b32 $2, t2, 0x87F00000;\n"
         "and.b32 $3, t3, 0x87F00000; }"),
        "=r,=r,=r,=r,r", [w.to(tl.uint8, bitcast=True)], dtype=tl.float32, is_pure=True,
        pack=4)


@triton.jit
def _bf16_to_f32(x):
    """bf16 -> float32 by one shift or mask a value (Triton's conversion takes 1.5)."""
    return tl.inline_asm_elementwise(
        "shl.b32 $0, $2, 16;\nand.b32 $1, $2, 0xFFFF0000;",
        "=r,=r,r", [x.to(tl.uint16, bitcast=True)], dtype=tl.float32, is_pure=True, pack=2)


@triton.jit
def _to_f32(t, PTX: tl.constexpr):
    if PTX and t.dtype == tl.bfloat16:
        t = _bf16_to_f32(t)
    else:
        t = t.to(tl.float32)
    return t


@triton.jit
def _k_split(pid_k, k_per_split, K, BLOCK_K: tl.constexpr):
    """Split-K: this program's first K offset and its number of BLOCK_K steps."""
    k_lo = pid_k * k_per_split
    return k_lo, tl.cdiv(tl.minimum(k_per_split, K - k_lo), BLOCK_K)


@triton.jit
def _load_k(ptrs, koff, K, EVEN_K: tl.constexpr):
    """A tile at K offsets ``koff``; zeros past K."""
    if EVEN_K:
        t = tl.load(ptrs)
    else:
        t = tl.load(ptrs, mask=koff < K, other=0.0)
    return t


@triton.jit
def _fma_row(acc, wf, x_row, koff, K, EVEN_K: tl.constexpr, PTX: tl.constexpr,
             CHUNK: tl.constexpr):
    """acc += W * x_row over the tile: x is read as a tile of the weight tile's shape whose
    rows are all the same addresses, so that it takes the weight tile's register layout (the
    compiler loads each address once per thread); a [BLOCK_K] load would be reshuffled
    through shared memory every step. CHUNK: the tile is [BN, BK / CHUNK, CHUNK] and each
    thread sums its CHUNK products at once, so acc holds BK / CHUNK, not BK, per row."""
    if CHUNK:
        same = tl.zeros([wf.shape[0], 1, 1], dtype=tl.int32)
    else:
        same = tl.zeros([wf.shape[0], 1], dtype=tl.int32)
    prod = wf * _to_f32(_load_k(x_row + same + koff, koff, K, EVEN_K), PTX)
    if CHUNK:
        prod = tl.sum(prod, axis=2)
    return acc + prod


@triton.jit
def _finish(y, s_ptr, bias_ptr, rn, N, pid_k, W_FP8: tl.constexpr, F32_BITS: tl.constexpr,
            HAS_BIAS: tl.constexpr):
    """Per-channel scale and bias (the first K range adds it) on y [..., BLOCK_N]."""
    s, b = _scale_bias(s_ptr, bias_ptr, rn, N, W_FP8, HAS_BIAS)
    return _apply_scale_bias(y, s, b, pid_k, W_FP8, F32_BITS, HAS_BIAS)


@triton.jit
def _scale_bias(s_ptr, bias_ptr, rn, N, W_FP8: tl.constexpr, HAS_BIAS: tl.constexpr):
    """``_finish``'s loads: the scales and bias of outputs ``rn`` (0.0 where there are none).
    Weights of the step, so they may be loaded before the PDL wait (``Prewait.scales``)."""
    rn_ld = tl.minimum(rn, N - 1)
    s = 0.0
    b = 0.0
    if W_FP8:
        s = tl.load(s_ptr + rn_ld)
    if HAS_BIAS:
        b = tl.load(bias_ptr + rn_ld).to(tl.float32)
    return s, b


@triton.jit
def _apply_scale_bias(y, s, b, pid_k, W_FP8: tl.constexpr, F32_BITS: tl.constexpr,
                      HAS_BIAS: tl.constexpr):
    """``_finish``'s arithmetic on loaded scales ``s`` and bias ``b``."""
    if F32_BITS:
        y *= 1.329227995784916e36  # 2^120, exact: undoes _e4m3_to_f32_scaled
    if W_FP8:
        y *= s
    if HAS_BIAS:
        y += tl.where(pid_k == 0, 1.0, 0.0) * b
    return y


@triton.jit
def _program_rows(pid_n, N, BLOCK_N: tl.constexpr, SILU_FOLD: tl.constexpr):
    """(output column, weight row) of each of a program's BLOCK_N tile rows: ``_fold_rows``
    under SILU_FOLD, else BLOCK_N consecutive rows, those past N clamped to row N - 1."""
    if SILU_FOLD:
        rn, w_rn = _fold_rows(pid_n, N, BLOCK_N)
    else:
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        w_rn = tl.minimum(rn, N - 1)
    return rn, w_rn


@triton.jit
def _fold_rows(pid_n, N, BLOCK_N: tl.constexpr):
    """SILU_FOLD: a program's BLOCK_N weight rows are BLOCK_N / 2 (gate, up) pairs, interleaved:
    tile row i is output column ``c = pid_n * BLOCK_N / 2 + i // 2`` of the gate half (i even,
    weight row c) or of the up half (i odd, weight row c + N; N = I, the output width). Returns
    (the output column of each tile row, its weight row clamped into its half)."""
    i = tl.arange(0, BLOCK_N)
    col = pid_n * (BLOCK_N // 2) + i // 2
    return col, tl.minimum(col, N - 1) + (i % 2) * N


@triton.jit
def store_silu_mul(y, out_row, col, limit):
    """The SILU_FOLD epilogue: ``y`` [BLOCK_N] float32 holds interleaved (gate, up) pairs of
    output columns ``col`` (each twice); both are rounded to the output dtype as the GEMV
    stores them, then combined as ``activation._silu_and_mul_kernel`` does (``silu_mul``), so
    the result is bitwise that of the GEMV followed by that kernel. Columns >= ``limit`` are
    not stored."""
    dt = out_row.dtype.element_ty
    gate, up = tl.split(tl.reshape(y.to(dt).to(tl.float32), [y.shape[0] // 2, 2]))
    c = tl.split(tl.reshape(col, [y.shape[0] // 2, 2]))[0]
    tl.store(out_row + c, silu_mul(gate, up, dt), mask=c < limit)


@triton.jit
def _finish_rows(s_ptr, bias_ptr, rn, w_rn, N, W_FP8: tl.constexpr, HAS_BIAS: tl.constexpr,
                 SILU_FOLD: tl.constexpr):
    """The scales and bias (``_scale_bias``) of a program's tile rows: by weight row under
    SILU_FOLD (``_fold_rows``), else by output column."""
    if SILU_FOLD:
        s, b = _scale_bias(s_ptr, bias_ptr, w_rn, 2 * N, W_FP8, HAS_BIAS)
    else:
        s, b = _scale_bias(s_ptr, bias_ptr, rn, N, W_FP8, HAS_BIAS)
    return s, b


@triton.jit
def _store_row(acc, r, s, b, out_ptr, rn, w_rn, M, N, stride_om, pid_k,
               W_FP8: tl.constexpr, F32_BITS: tl.constexpr, HAS_BIAS: tl.constexpr,
               SILU_FOLD: tl.constexpr):
    """Row r's sums to out (``out_ptr``: this split's plane, ``_split_plane``); ``s``, ``b``:
    the tile rows' scales and bias (``_finish_rows``)."""
    y = _apply_scale_bias(tl.sum(acc, axis=1), s, b, pid_k, W_FP8, F32_BITS, HAS_BIAS)
    if SILU_FOLD:  # w_rn: weight rows in [0, 2N) (gate, up pairs), rn: output columns
        store_silu_mul(y, out_ptr + r * stride_om, rn, tl.where(r < M, N, 0))
    else:
        ptrs = out_ptr + r * stride_om + rn
        ok = (rn < N) & (tl.zeros_like(rn) + r < M)
        tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _split_plane(out_ptr, pid_k, stride_split):
    """Split ``pid_k``'s plane of the output (``common._split_out``; stride 0: one plane)."""
    return out_ptr + pid_k.to(tl.int64) * stride_split


@triton.jit
def _gemv_fma_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                     stride_om, stride_split, k_per_split, res_ptr, g_ptr, normed_ptr,
                     counter_ptr, eps, y_ptr, split_ctr_ptr,
                     W_FP8: tl.constexpr, W_PTX: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                     CHUNK: tl.constexpr, F32_BITS: tl.constexpr, PTX: tl.constexpr,
                     SILU_FOLD: tl.constexpr, PRE_TILES: tl.constexpr, PRE_L2: tl.constexpr,
                     PRE_S: tl.constexpr, NORM_EPI: tl.constexpr, NORM_BLOCK: tl.constexpr,
                     SPLIT_LAST: tl.constexpr, USE_PDL: tl.constexpr):
    """Up to 4 rows of x (BLOCK_M 1, 2 or 4), one float32 accumulator tile per row.
    SILU_FOLD: W is a stacked [gate; up] ``[2N, K]``, out ``[M, N]`` gets silu(gate) * up
    (``_fold_rows``, ``store_silu_mul``); the K loop is the same. PRE_TILES, PRE_L2, PRE_S:
    what the program reads of its weights before the PDL wait (``Prewait``); the sums are
    bitwise the same either way (same steps, same order). NORM_EPI (one row, one K range, no
    SILU_FOLD): the last program runs the residual-add RMSNorm of the output row
    (``norm_epilogue``) where it is ``NORM_LAST``; ``FOLD_OUT`` / ``FOLD_IN`` (one row): the two
    halves of the norm split between two GEMVs (``norm_fold.py``). SPLIT_LAST (> 0: the number
    of K ranges, no SILU_FOLD, NORM_LAST or FOLD_OUT): each N tile's last program stores the
    planes' sum in order to ``y_ptr`` (``split_last_combine``; y ``[M, N]`` has the planes' row
    stride)."""
    pdl_launch(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn, w_rn = _program_rows(pid_n, N, BLOCK_N, SILU_FOLD)
    row = w_rn.to(tl.int64)[:, None] * stride_wn
    k_lo, steps = _k_split(pid_k, k_per_split, K, BLOCK_K)
    if CHUNK:
        j = tl.arange(0, BLOCK_K // CHUNK)[:, None] * CHUNK + tl.arange(0, CHUNK)[None, :]
        k_in = j[None, :, :]  # [1, BK / CHUNK, CHUNK]
        w_rows = w_ptr + row[:, :, None]
        acc0 = tl.zeros((BLOCK_N, BLOCK_K // CHUNK), dtype=tl.float32)
    else:
        k_in = tl.arange(0, BLOCK_K)[None, :]  # [1, BK]
        w_rows = w_ptr + row
        acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1, acc2, acc3 = acc0, acc0, acc0
    if PRE_S:
        s, b = _finish_rows(s_ptr, bias_ptr, rn, w_rn, N, W_FP8, HAS_BIAS, SILU_FOLD)
    if PRE_L2:
        w_bytes: tl.constexpr = w_ptr.dtype.element_ty.primitive_bitwidth // 8
        _prefetch_rows_l2(w_ptr, pid_n, N, stride_wn, k_lo,
                          tl.minimum(k_per_split, K - k_lo) * w_bytes, BLOCK_N, SILU_FOLD)
    if NORM_EPI == FOLD_OUT:  # the norm weight: a weight of the step (norm_fold.py)
        g_out = fold_out_weight(rn, N, g_ptr)
    # PRE_TILES: the first steps' weight tiles (a step past the last reads the last again and
    # adds nothing: ``_pre_k``)
    tl.static_assert(PRE_TILES <= 2, "Prewait.tiles: at most 2")
    if PRE_TILES > 0:
        w0 = _load_k(w_rows + _pre_k(k_lo, 0, steps, k_in, BLOCK_K),
                     _pre_k(k_lo, 0, steps, k_in, BLOCK_K), K, EVEN_K)
    if PRE_TILES > 1:
        w1 = _load_k(w_rows + _pre_k(k_lo, 1, steps, k_in, BLOCK_K),
                     _pre_k(k_lo, 1, steps, k_in, BLOCK_K), K, EVEN_K)
    pdl_wait(USE_PDL)
    if NORM_EPI == FOLD_OUT:  # the residual, in flight under the K loop (norm_fold.py)
        r_out = fold_out_residual(rn, N, res_ptr)
    x0 = x_ptr
    x1 = x_ptr + tl.minimum(1, M - 1) * stride_xm
    x2 = x_ptr + tl.minimum(2, M - 1) * stride_xm
    x3 = x_ptr + tl.minimum(3, M - 1) * stride_xm
    if PRE_TILES > 0:
        acc0, acc1, acc2, acc3 = _fma_pre(acc0, acc1, acc2, acc3, w0, 0, steps, k_lo, k_in,
                                          BLOCK_K, x0, x1, x2, x3, x_ptr, K, EVEN_K, BLOCK_M,
                                          F32_BITS, W_FP8, W_PTX, PTX, CHUNK)
    if PRE_TILES > 1:
        acc0, acc1, acc2, acc3 = _fma_pre(acc0, acc1, acc2, acc3, w1, 1, steps, k_lo, k_in,
                                          BLOCK_K, x0, x1, x2, x3, x_ptr, K, EVEN_K, BLOCK_M,
                                          F32_BITS, W_FP8, W_PTX, PTX, CHUNK)
    for i in tl.range(PRE_TILES, steps, num_stages=STAGES):
        koff = k_lo + i * BLOCK_K + k_in
        w = _load_k(w_rows + koff, koff, K, EVEN_K)
        acc0, acc1, acc2, acc3 = _fma_step(acc0, acc1, acc2, acc3, w, koff, x0, x1, x2, x3,
                                           x_ptr, K, EVEN_K, BLOCK_M, F32_BITS, W_FP8, W_PTX,
                                           PTX, CHUNK)
    if not PRE_S:
        s, b = _finish_rows(s_ptr, bias_ptr, rn, w_rn, N, W_FP8, HAS_BIAS, SILU_FOLD)
    if NORM_EPI == FOLD_IN:  # one row: the sums times the norm's rstd (norm_fold.py)
        acc0 = acc0 * fold_rstd(counter_ptr, K, eps, NORM_BLOCK)
    if NORM_EPI == FOLD_OUT:  # one row, one K range: h, round(h * g), a partial sum
        y = _apply_scale_bias(tl.sum(acc0, axis=1), s, b, pid_k, W_FP8, F32_BITS, HAS_BIAS)
        fold_out(y, r_out, g_out, rn, N, pid_n, normed_ptr, res_ptr, counter_ptr,
                 NORM_BLOCK)
    else:
        args = (s, b, _split_plane(out_ptr, pid_k, stride_split), rn, w_rn, M, N,
                stride_om, pid_k, W_FP8, F32_BITS, HAS_BIAS, SILU_FOLD)
        _store_row(acc0, 0, *args)
        if BLOCK_M > 1:
            _store_row(acc1, 1, *args)
        if BLOCK_M > 2:
            _store_row(acc2, 2, *args)
            _store_row(acc3, 3, *args)
    if SPLIT_LAST > 0:
        split_last_combine(out_ptr, y_ptr, split_ctr_ptr, pid_n, rn, M, N, stride_split,
                           stride_om, stride_om, BLOCK_M, SPLIT_LAST)
    if NORM_EPI == NORM_LAST:
        norm_epilogue(out_ptr, res_ptr, g_ptr, normed_ptr, counter_ptr, N, eps, NORM_BLOCK, PTX)


@triton.jit
def _fma_step(acc0, acc1, acc2, acc3, w, koff, x0, x1, x2, x3, x_ptr, K, EVEN_K: tl.constexpr,
              BLOCK_M: tl.constexpr, F32_BITS: tl.constexpr, W_FP8: tl.constexpr,
              W_PTX: tl.constexpr, PTX: tl.constexpr, CHUNK: tl.constexpr):
    """One K step of ``_gemv_fma_kernel``: the weight tile ``w`` (at K offsets ``koff``)
    widened and multiplied into each row's accumulator (``x0``-``x3``: the rows' pointers)."""
    if F32_BITS:
        wf = _e4m3_to_f32_scaled(w)
    else:
        wf = _widen(w, x_ptr.dtype.element_ty, W_FP8, W_PTX, True, PTX)
    acc0 = _fma_row(acc0, wf, x0, koff, K, EVEN_K, PTX, CHUNK)
    if BLOCK_M > 1:
        acc1 = _fma_row(acc1, wf, x1, koff, K, EVEN_K, PTX, CHUNK)
    if BLOCK_M > 2:
        acc2 = _fma_row(acc2, wf, x2, koff, K, EVEN_K, PTX, CHUNK)
        acc3 = _fma_row(acc3, wf, x3, koff, K, EVEN_K, PTX, CHUNK)
    return acc0, acc1, acc2, acc3


@triton.jit
def _pre_k(k_lo, j: tl.constexpr, steps, k_in, BLOCK_K: tl.constexpr):
    """K offsets of pre-loaded step ``j``: the program's last step where ``j`` is past it."""
    return k_lo + tl.minimum(j, steps - 1) * BLOCK_K + k_in


@triton.jit
def _fma_pre(acc0, acc1, acc2, acc3, w, j: tl.constexpr, steps, k_lo, k_in,
             BLOCK_K: tl.constexpr, x0, x1, x2, x3, x_ptr, K, EVEN_K: tl.constexpr,
             BLOCK_M: tl.constexpr, F32_BITS: tl.constexpr, W_FP8: tl.constexpr,
             W_PTX: tl.constexpr, PTX: tl.constexpr, CHUNK: tl.constexpr):
    """``_fma_step`` on pre-loaded step ``j``'s tile; the accumulators unchanged (bitwise)
    where the program has fewer than ``j + 1`` steps."""
    koff = _pre_k(k_lo, j, steps, k_in, BLOCK_K)
    a0, a1, a2, a3 = _fma_step(acc0, acc1, acc2, acc3, w, koff, x0, x1, x2, x3, x_ptr, K,
                               EVEN_K, BLOCK_M, F32_BITS, W_FP8, W_PTX, PTX, CHUNK)
    if j > 0:
        keep = j >= steps
        a0 = tl.where(keep, acc0, a0)
        a1 = tl.where(keep, acc1, a1)
        a2 = tl.where(keep, acc2, a2)
        a3 = tl.where(keep, acc3, a3)
    return a0, a1, a2, a3


@triton.jit
def _program_row(pid_n, i: tl.constexpr, N, BLOCK_N: tl.constexpr, SILU_FOLD: tl.constexpr):
    """Weight row of a program's tile row ``i`` as a scalar (``_program_rows``' element i)."""
    if SILU_FOLD:
        r = tl.minimum(pid_n * (BLOCK_N // 2) + i // 2, N - 1) + (i % 2) * N
    else:
        r = tl.minimum(pid_n * BLOCK_N + i, N - 1)
    return r


@triton.jit
def _prefetch_rows_l2(w_ptr, pid_n, N, stride_wn, k_lo, nbytes, BLOCK_N: tl.constexpr,
                      SILU_FOLD: tl.constexpr):
    """Ask the L2 for the ``nbytes`` of each of the program's weight rows it reads from
    element ``k_lo`` on (``pdl.prefetch_l2``: one request a row from one thread; sm90+)."""
    for i in tl.static_range(BLOCK_N):
        r = _program_row(pid_n, i, N, BLOCK_N, SILU_FOLD).to(tl.int64)
        prefetch_l2((w_ptr + r * stride_wn + k_lo).to(tl.int64), nbytes)


@triton.jit
def _gemv_dot_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn,
                     stride_om, stride_split, k_per_split,
                     W_FP8: tl.constexpr, W_PTX: tl.constexpr, HAS_BIAS: tl.constexpr,
                     EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr,
                     DOT_FP32: tl.constexpr, USE_PDL: tl.constexpr):
    """``acc[BN, BM] += dot(W tile, x tile.T)``: BLOCK_M >= 16 rows, tensor cores.
    DOT_FP32: float32 operands, exact products (the interpreter; float32 x)."""
    pdl_start(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rm = tl.arange(0, BLOCK_M)
    w_rows = w_ptr + tl.minimum(rn, N - 1).to(tl.int64)[:, None] * stride_wn  # [BN, 1]
    x_rows = x_ptr + tl.minimum(rm, M - 1).to(tl.int64)[:, None] * stride_xm  # [BM, 1]
    k_lo, steps = _k_split(pid_k, k_per_split, K, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for i in tl.range(0, steps, num_stages=STAGES):
        koff = k_lo + i * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        w = _load_k(w_rows + koff, koff, K, EVEN_K)
        x = _load_k(x_rows + koff, koff, K, EVEN_K)
        if DOT_FP32:
            wf = _widen(w, x.dtype, W_FP8, W_PTX, True, False)
            acc += tl.dot(wf, tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(_widen(w, x.dtype, W_FP8, W_PTX, False, False), tl.trans(x))
    y = _finish(tl.trans(acc), s_ptr, bias_ptr, rn, N, pid_k, W_FP8, False, HAS_BIAS)
    _store_tile(y, _split_plane(out_ptr, pid_k, stride_split), rm, rn, M, N, stride_om)


@triton.jit
def _store_tile(y, out_ptr, rm, rn, M, N, stride_om):
    """y [BM, BN] to rows rm, columns rn of out (a split's plane: ``_split_plane``)."""
    ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    tl.store(ptrs, y.to(out_ptr.dtype.element_ty), mask=ok)


def gemv_config(m: int, n: int, k: int, w_fp8: bool, num_sms: int = 132) -> GemvConfig:
    """The launch shape for ``m`` rows against an ``[n, k]`` weight. From the H200 sweep of
    ``benchmarks/kernels/gemv_bench.py`` (Llama-3.1-8B shapes at TP 1 and 2 and the LM head,
    CUDA graph): at M <= 2 each of these FMA tiles was within 1% (bf16) or 8-16% (e4m3) of the
    fastest tile of its shape; from M = 3 on the tensor-core tiles win, though neither beats
    cuBLAS (bf16) or ``weight_only.fp8_w8a16_tiled`` (e4m3) there."""
    if m > GEMV_MAX_M:
        raise ValueError(f"gemv serves at most {GEMV_MAX_M} rows, got {m}; use a GEMM")
    tuned = BF16_SPLIT_TABLE.get((n, k)) if m == 1 and not w_fp8 else None
    if tuned is not None and split_last_enabled():  # TESSELLM_GEMV_SPLIT_LAST
        block_n, block_k, warps, split = tuned
        return GemvConfig(block_n=block_n, block_k=block_k, num_warps=warps, stages=1,
                          split_k=split, chunk=8, split_last=True)
    if m <= 2 and w_fp8:
        cfg = GemvConfig(block_n=2, block_k=1024, num_warps=4, stages=1, chunk=16,
                         f32_bits=True)
    elif m <= 2:
        cfg = GemvConfig(block_n=2, block_k=1024 if m == 1 else 512, num_warps=4, stages=1,
                         chunk=8)
    elif w_fp8:
        cfg = GemvConfig(block_n=64, block_k=256 if m <= 8 else 128, num_warps=4, stages=3,
                         dot=True)
    elif m <= 8:
        cfg = GemvConfig(block_n=64, block_k=128, num_warps=4, stages=3 if m <= 4 else 4,
                         dot=True)
    else:
        cfg = GemvConfig(block_n=16, block_k=128, num_warps=4, stages=4, dot=True)
    return _with_split(cfg, n, k, num_sms)


def _with_split(cfg: GemvConfig, n: int, k: int, num_sms: int) -> GemvConfig:
    """Split K only when the N tiles alone leave SMs idle (the planes' sum and cast cost two
    kernels)."""
    split = 1
    tiles = triton.cdiv(n, cfg.block_n)
    while tiles * split < num_sms and k >= cfg.block_k * split * 4 and split < 16:
        split *= 2
    return dataclasses.replace(cfg, split_k=split)


def _ptx(x: torch.Tensor) -> bool:
    """Inline PTX (bit-moving conversions) can run: compiled, on NVIDIA."""
    return not _interpreted(x) and torch.version.hip is None


@dataclass(frozen=True)
class Prewait:
    """What a one-row GEMV program reads of its weights before its PDL wait, while the kernel
    before it still runs (``kernels/pdl.py``). Invariant: no kernel of a step writes the
    weight, scales or bias of a GEMV (every caller passes model parameters, written only
    between steps). The sums and outputs are bitwise the same with any of it: the same K steps
    in the same order. Registers (sm_90, Triton 3.9): one tile keeps each launch shape's
    register bucket (x2 4x256: 39 -> 40, 2x512: 32; FMA 2x1024: 28 -> 30), two tiles take
    x2 4x256 to 42 and 2x512 to 33-35 (fewer programs an SM); four took 48-60, so at most
    two."""

    tiles: int = 0  # its first K steps' weight tiles, into registers (0-2)
    l2: bool = False  # its whole weight slice asked of the L2 (sm90+, under PDL only)
    scales: bool = False  # its per-channel scales and bias (else loaded in the epilogue)


# TESSELLM_GEMV_PREWAIT (``envs.gemv_prewait``), read once; benchmarks set it between
# captures (a captured graph keeps the launches it was captured with).
PREWAIT = Prewait(*envs.gemv_prewait())


def prewait_args(x: torch.Tensor) -> dict:
    """The ``PRE_*`` constexprs of a one-row GEMV kernel on ``x``'s device (``PREWAIT``): the
    L2 request only where it can help and compile (under PDL, so on sm90+)."""
    p = PREWAIT
    l2 = (p.l2 and _ptx(x) and pdl_enabled(x.device)
          and _capability(x.device.index or 0)[0] >= 9)
    return dict(PRE_TILES=p.tiles, PRE_L2=l2, PRE_S=p.scales)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
         config: Optional[GemvConfig] = None) -> torch.Tensor:
    """``x [M, K] @ weight[N, K].T (+ bias)`` for M <= ``GEMV_MAX_M``, weight in x's dtype."""
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    return _launch(x, weight, None, bias, config, w_ptx=False)


def gemv_fp8(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
             bias: Optional[torch.Tensor] = None,
             config: Optional[GemvConfig] = None) -> torch.Tensor:
    """W8A16: ``x [M, K] @ (qweight * scales[:, None]).T (+ bias)``; ``qweight`` e4m3fn or
    e4m3fnuz ``[N, K]``, ``scales`` float32 ``[N]``, x bf16/fp16/fp32, unquantized."""
    w_ptx = (_ptx(x) and qweight.dtype == torch.float8_e4m3fn
             and x.dtype in (torch.bfloat16, torch.float16))
    return _launch(x, qweight, scales, bias, config, w_ptx=w_ptx)


def gemv_silu_and_mul(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
                      config: Optional[GemvConfig] = None) -> torch.Tensor:
    """``silu_and_mul(gemv(x, weight, bias))`` in one launch for a stacked ``[gate; up]``
    weight ``[2I, K]`` and x ``[M, K]``, M <= ``GEMV_FOLD_MAX_M``: returns ``[M, I]``, bitwise
    what the two launches give (``store_silu_mul``). Each program reads (gate, up) row pairs
    j, j + I over the whole of K (no split-K: the epilogue needs both sums) with the tiles
    ``gemv_config`` gives the ``[2I, K]`` product."""
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    return _launch(x, weight, None, bias, config, w_ptx=False, silu_fold=True)


GEMV_FOLD_MAX_M = 2  # gemv_silu_and_mul: the FMA kernel's rows (its M <= 2 tiles)


def _fold_config(cfg: GemvConfig, m: int, n: int) -> GemvConfig:
    if m > GEMV_FOLD_MAX_M or n % 2 or cfg.dot or cfg.block_n % 2:
        raise ValueError(f"gemv_silu_and_mul: at most {GEMV_FOLD_MAX_M} rows against a stacked "
                         f"[gate; up] weight of an even row count, FMA tiles of an even block_n; "
                         f"got {m} rows, {n} weight rows, {cfg}")
    return dataclasses.replace(cfg, split_k=1)


def gemv_then_add_rms_norm(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor,
                           norm_weight: torch.Tensor, eps: float,
                           bias: Optional[torch.Tensor] = None,
                           config: Optional[GemvConfig] = None) -> tuple:
    """``fused_add_rms_norm(gemv(x, weight, bias), residual, norm_weight, eps)`` in one launch
    (``norm_epilogue``) for one 16-bit row: returns ``(normed [1, N], residual)``, the residual
    updated in place, bitwise the two launches. The FMA kernel on ``gemv_config``'s tiles,
    whole K a program (the last program needs every output).
    ``norm_epilogue.norm_epilogue_applies`` must hold."""
    if weight.dtype != x.dtype:
        raise TypeError(f"gemv: weight is {weight.dtype} but x is {x.dtype}; cast one of them")
    n = weight.shape[0]
    if not norm_epilogue_applies(x, n, residual, norm_weight):
        raise ValueError(f"gemv_then_add_rms_norm: one 16-bit row, a residual [1, {n}] of x's "
                         f"dtype and a norm weight [{n}] (at most {NORM_EPILOGUE_MAX_N} "
                         f"outputs); got x {tuple(x.shape)} {x.dtype}, residual "
                         f"{tuple(residual.shape)} {residual.dtype}, weight "
                         f"{tuple(norm_weight.shape)}")
    norm = make_epilogue(x, weight.data_ptr(), n, residual, norm_weight, eps)
    _launch(x, weight, None, bias, config, w_ptx=False, norm=norm)
    return norm.normed, residual


def _launch(x, w, scales, bias, config, w_ptx: bool, silu_fold: bool = False,
            norm: Optional[NormEpilogue] = None, fold: Optional[tuple] = None):
    """The GEMV of ``x`` against ``w``. ``fold`` (``gemv_fold.py``, one row, the FMA kernel):
    ``("out", residual, norm_weight)`` runs the producer's half of a split norm (returns
    ``(xg, sumsq)``, one K range a program) or ``("in", sumsq, eps)`` the consumer's."""
    x = x.contiguous()
    m, k = x.shape
    n = w.shape[0]
    if w.shape[1] != k or w.stride(1) != 1:
        raise ValueError(f"gemv: weight must be a row-major [N, {k}] matrix, got shape "
                         f"{tuple(w.shape)} strides {w.stride()}")
    if m == 0:
        return torch.empty(0, n // 2 if silu_fold else n, dtype=x.dtype, device=x.device)
    cfg = config or gemv_config(m, n, k, scales is not None,
                                1 if _interpreted(x) else _num_sms(x.device.index or 0))
    if config is None and _interpreted(x) and not cfg.dot:
        cfg = dataclasses.replace(cfg, block_n=max(cfg.block_n, INTERPRETED_MIN_BLOCK_N))
    if silu_fold:
        cfg = _fold_config(cfg, m, n)
        n //= 2  # the output width, I; the grid below covers BLOCK_N / 2 outputs a program
    if norm is not None or fold is not None:  # the FMA kernel, whole K a program (epilogues)
        cfg = dataclasses.replace(cfg, dot=False, split_k=1)
    if not cfg.dot and m > 4:
        raise ValueError(f"gemv: the FMA kernel takes at most 4 rows, got {m}; use dot=True")
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.block_k), cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    out = _split_out(x, m, n, split)  # split > 1: a float32 plane per K range
    tiles = triton.cdiv(n, cfg.block_n // 2 if silu_fold else cfg.block_n)
    y = None
    if (split > 1 and not cfg.dot and not silu_fold and norm is None
            and (cfg.split_last or split_last_enabled())):  # combined in the launch
        y = torch.empty(m, n, dtype=x.dtype, device=x.device)
        combine = split_last_args(y, tile_counters(x.device, w.data_ptr(), tiles), split, x)
    else:
        combine = split_last_args(None, None, 0, x)
    args = (x, w, scales if scales is not None else x, bias if bias is not None else x, out,
            m, n, k, x.stride(0), w.stride(0), out.stride(-2), _split_stride(out), k_per_split)
    meta = dict(W_FP8=scales is not None, W_PTX=w_ptx, HAS_BIAS=bias is not None,
                EVEN_K=k % k_per_split == 0, BLOCK_N=cfg.block_n,
                BLOCK_K=cfg.block_k, STAGES=cfg.stages, num_warps=cfg.num_warps,
                num_stages=cfg.stages)
    grid = (tiles, split)
    epi, sumsq = epilogue_args(norm, x), None
    if fold is not None and fold[0] == "out":
        epi, sumsq = producer_args(grid[0], out, fold[1], fold[2])
    elif fold is not None:
        epi = consumer_args(fold[1], fold[2], x)
    if cfg.dot:
        _gemv_dot_kernel[grid](*args, BLOCK_M=max(16, triton.next_power_of_2(m)),
                               DOT_FP32=_interpreted(x) or x.dtype == torch.float32, **meta,
                               **pdl_args(x.device))
    else:
        _gemv_fma_kernel[grid](*args, BLOCK_M=triton.next_power_of_2(m), CHUNK=cfg.chunk,
                               F32_BITS=cfg.f32_bits and w_ptx, PTX=_ptx(x),
                               SILU_FOLD=silu_fold, **epi, **prewait_args(x), **combine,
                               **meta, **pdl_args(x.device))
    if sumsq is not None:
        return out, sumsq
    return y if y is not None else _split_sum(out, x.dtype)
