"""``gemv_fp8_x2`` (one bf16 row, e4m3fn, NVIDIA sm90+; ``weight_only.fp8_w8a16`` takes it for
every M = 1 product, ``TESSELLM_FP8_GEMV_X2=0`` turns it off) breaks that bound with packed
bf16 arithmetic: four codes a 32-bit word become two bf16x2 pairs by a byte permute, a shift
and a mask each (x 2^-120, exact), and ``mul``/``fma.rn.bf16x2`` against four x values form two
lanes of two products, widened and summed in float32: 12 instructions per 4 codes, about 3 a
code against 5. The two products of a lane round to bf16 (relative error 2.6e-3 against the
float32 dequantized product, 1.7e-3 for ``gemv_fp8``, both far under e4m3's own ~6%). H200,
M = 1 (``benchmarks/results/h200-2026-11-21e/x2bench.json``): qkv / o / gate_up / down 8.7 /
6.7 / 31.8 / 16.5 us against 10.7 / 7.9 / 35.5 / 21.3 with the best of the earlier two
kernels; the LM head 121.5 against 133.0 (4.3 TB/s). Engine B1 (fp8 weights) 2.741 against
3.203 ms per token, bf16 4.138 in the same run (0.66x).

Two kernels share that arithmetic: ``_gemv_e4m3_x2_kernel`` (one program a tile of BLOCK_N rows,
split K where the tiles cannot fill the GPU, each K range into its own float32 plane, summed
after: ``common._split_sum``) and
``_gemv_e4m3_x2_stream_kernel`` (a persistent grid of a few programs an SM streaming tile after
tile, each as a flat loop over K steps with the next step's words loaded before this step's
arithmetic). Only the order of the float32 sum differs between them. Which one and which tiles
a weight shape takes is a table measured on the device (``gemv_x2_table.py``, written by
``benchmarks/kernels/x2_sweep.py``), never an autotune at serve time. H200, 2026-12-04, graphs
of back-to-back calls with PDL over 1.5 GB of weight copies: the rules' tiled kernel reads qkv /
o / gate_up / down at 3.08 / 2.67 / 3.82 / 3.72 TB/s (a layer's four: 3.56); the streamed
kernel was slower on qkv, gate_up and down by 5-9% at its best, equal on o; the register
prefetch slowed 26 of 28 tiles (92 registers instead of 48: half the programs an SM) and a
persistent grid of 4 programs an SM was the slowest of all. The gap to the weight floor
(51.3 us a layer at 4.25 TB/s, 61.3 measured) is ~2-3 us a launch of ramp and tail, not the
read rate of the large shapes. ``TESSELLM_GEMV_SPLIT_LAST`` (``split_last.py``, off until timed):
the tiled kernel splits K by ``gemv_x2_table.SPLIT_TABLE`` (4-tuples: a split per shape) and its
rules, each N tile's last program adding the K ranges' planes in a fixed order, no second launch.

``gemv_fp8_x2_silu_and_mul``: the tiled kernel with SILU_FOLD (the MLP's gate_up at one row):
program rows in (gate j, up j + I) pairs, each with its own scale, SiLU-and-mul in the
epilogue, bitwise ``gemv_fp8_x2`` then ``silu_and_mul`` (``gemv.py``'s SiLU paragraph).
``gemv_fp8_x2_then_add_rms_norm``: the tiled kernel with NORM_EPI, the residual-add RMSNorm of
the output row by the last program to finish (``norm_epilogue.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (_interpreted, _num_sms, _split_out, _split_stride,
                                          _split_sum)
from tessellm.kernels.gemm.gemv import (GemvConfig, _apply_scale_bias, _finish, _finish_rows,
                                        _prefetch_rows_l2, _program_rows, _ptx, _with_split,
                                        prewait_args, store_silu_mul)
from tessellm.kernels.gemm.gemv_x2_table import PREWAIT_TILES, SPLIT_TABLE, X2_TABLE
from tessellm.kernels.gemm.norm_epilogue import (NORM_EPILOGUE_MAX_N, epilogue_args,
                                                  make_epilogue, norm_epilogue,
                                                  norm_epilogue_applies)
from tessellm.kernels.gemm.split_last import (split_last_args, split_last_combine,
                                              split_last_enabled, tile_counters)
from tessellm.kernels.gemm.norm_fold import (FOLD_IN, FOLD_OUT, NORM_LAST, fold_out,
                                             fold_out_residual, fold_out_weight, fold_rstd)
from tessellm.kernels.pdl import pdl_args, pdl_launch, pdl_start, pdl_wait


@triton.jit
def _dot4_e4m3_bf16x2(acc, w, x):
    """acc (float32) + the dot product of 4 e4m3 codes (one 32-bit word ``w``) with 4 bf16
    values (one 64-bit word ``x``) times 2^-120, in 12 instructions: each code pair becomes
    bf16x2 by a byte permute (sign replicated above the low code), an arithmetic shift and a
    mask; a packed multiply and fma give two lanes of two products each (rounded to bf16), which
    are widened and added to acc in float32."""
    return tl.inline_asm_elementwise(
        ("{ .reg .b32 xa, xb, t0, t1, p;\n"
         "mov.b64 {xa, xb}, $3;\n"
         "prmt.b32 t0, $2, 0, 0x1804;\n"   # [c1, sign(c0) x8, c0, 0]
         "prmt.b32 t1, $2, 0, 0x3A24;\n"   # [c3, sign(c2) x8, c2, 0]
         "shr.s32 t0, t0, 4;\n"
         "shr.s32 t1, t1, 4;\n"
         "and.b32 t0, t0, 0x87F087F0;\n"   # two bf16 lanes: code * 2^-120
         "and.b32 t1, t1, 0x87F087F0;\n"
         "mul.rn.bf16x2 p, t0, xa;\n"
         "fma.rn.bf16x2 p, t1, xb, p;\n"
         "shl.b32 t0, p, 16;\n"
         "and.b32 t1, p, 0xFFFF0000;\n"
         "add.f32 t0, t0, t1;\n"
         "add.f32 $0, $1, t0; }"),
        "=f,f,r,l", [acc, w, x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _dot4_e4m3_bf16_ref(acc, w, x):
    """``_dot4_e4m3_bf16x2`` without inline PTX (Triton's interpreter): exact float32 sums of
    the same products, the codes times 2^-120."""
    for i in tl.static_range(4):
        code = ((w >> (8 * i)) & 0xFF).to(tl.uint8).to(tl.float8e4nv, bitcast=True)
        xi = ((x >> (16 * i)) & 0xFFFF).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        acc += code.to(tl.float32) * 7.52316384526264e-37 * xi.to(tl.float32)  # 2^-120
    return acc


@triton.jit
def _gemv_e4m3_x2_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, N, KW, stride_wn_words,
                         words_per_split, stride_split, res_ptr, g_ptr, normed_ptr, counter_ptr,
                         eps, y_ptr, split_ctr_ptr, HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr, PTX: tl.constexpr,
                         SILU_FOLD: tl.constexpr, PRE_TILES: tl.constexpr,
                         PRE_L2: tl.constexpr, PRE_S: tl.constexpr, NORM_EPI: tl.constexpr,
                         NORM_BLOCK: tl.constexpr, SPLIT_LAST: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """One row of bf16 x against e4m3 weights, 4 codes a 32-bit word (``_dot4_e4m3_bf16x2``).
    ``KW``: words in a weight row (K / 4); x is read as 64-bit words of 4 values. SILU_FOLD:
    the weight is a stacked [gate; up] ``[2N, K]`` and out ``[1, N]`` gets silu(gate) * up
    (``gemv._fold_rows``, ``gemv.store_silu_mul``; each row its own scale); same K loop.
    PRE_TILES, PRE_L2, PRE_S: what the program reads of its weights before the PDL wait
    (``gemv.Prewait``); bitwise the same sums either way (same steps, same order).
    NORM_EPI ``NORM_LAST`` (one K range, no SILU_FOLD): the last program runs the residual-add
    RMSNorm of the output row (``norm_epilogue``); ``FOLD_OUT`` (one K range, no SILU_FOLD) /
    ``FOLD_IN``: the two halves of the norm split between two GEMVs (``norm_fold.py``).
    SPLIT_LAST (> 0: the number of K ranges, no SILU_FOLD, NORM_LAST or FOLD_OUT): ``out_ptr``
    holds the float32 planes, and each N tile's last program stores their sum in order to
    ``y_ptr`` (``split_last_combine``)."""
    pdl_launch(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn, w_rn = _program_rows(pid_n, N, BLOCK_N, SILU_FOLD)
    row = w_rn.to(tl.int64)[:, None] * stride_wn_words
    w_words = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    x_words = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    kw = tl.arange(0, BLOCK_KW)[None, :]
    same = tl.zeros([BLOCK_N, 1], dtype=tl.int32)  # x in the weight tile's layout (_fma_row)
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    k_lo = pid_k * words_per_split
    steps = tl.cdiv(tl.minimum(words_per_split, KW - k_lo), BLOCK_KW)
    if PRE_S:
        s, b = _finish_rows(s_ptr, bias_ptr, rn, w_rn, N, True, HAS_BIAS, SILU_FOLD)
    if PRE_L2:
        _prefetch_rows_l2(w_words, pid_n, N, stride_wn_words, k_lo,
                          tl.minimum(words_per_split, KW - k_lo) * 4, BLOCK_N, SILU_FOLD)
    if NORM_EPI == FOLD_OUT:  # the norm weight: a weight of the step (norm_fold.py)
        g_out = fold_out_weight(rn, N, g_ptr)
    # PRE_TILES: the first steps' weight words (a step past the program's last reads the last
    # again and adds nothing: ``_x2_pre``)
    tl.static_assert(PRE_TILES <= 2, "Prewait.tiles: at most 2")
    if PRE_TILES > 0:
        w0 = _x2_words(w_words, row, _x2_pre_k(k_lo, 0, steps, kw, BLOCK_KW), KW, EVEN_K)
    if PRE_TILES > 1:
        w1 = _x2_words(w_words, row, _x2_pre_k(k_lo, 1, steps, kw, BLOCK_KW), KW, EVEN_K)
    pdl_wait(USE_PDL)
    if NORM_EPI == FOLD_OUT:  # the residual, in flight under the K loop (norm_fold.py)
        r_out = fold_out_residual(rn, N, res_ptr)
    if PRE_TILES > 0:
        acc = _x2_pre(acc, w0, 0, x_words, same, k_lo, steps, kw, KW, EVEN_K, BLOCK_KW, PTX)
    if PRE_TILES > 1:
        acc = _x2_pre(acc, w1, 1, x_words, same, k_lo, steps, kw, KW, EVEN_K, BLOCK_KW, PTX)
    for i in range(PRE_TILES, steps):
        koff = k_lo + i * BLOCK_KW + kw
        acc = _x2_step(acc, _x2_words(w_words, row, koff, KW, EVEN_K), x_words, same, koff, KW,
                       EVEN_K, PTX)
    if not PRE_S:
        s, b = _finish_rows(s_ptr, bias_ptr, rn, w_rn, N, True, HAS_BIAS, SILU_FOLD)
    y = tl.sum(acc, axis=1)
    if NORM_EPI == FOLD_IN:  # the sums times the norm's rstd (norm_fold.py)
        y = y * fold_rstd(counter_ptr, KW * 4, eps, NORM_BLOCK)
    y = _apply_scale_bias(y, s, b, pid_k, True, True, HAS_BIAS)
    if SILU_FOLD:
        store_silu_mul(y, out_ptr, rn, N)
    elif NORM_EPI == FOLD_OUT:  # one K range: h, round(h * g), a partial sum (norm_fold.py)
        fold_out(y, r_out, g_out, rn, N, pid_n, normed_ptr, res_ptr, counter_ptr,
                 NORM_BLOCK)
    else:
        tl.store(out_ptr + pid_k.to(tl.int64) * stride_split + rn,
                 y.to(out_ptr.dtype.element_ty), mask=rn < N)
        if SPLIT_LAST > 0:
            split_last_combine(out_ptr, y_ptr, split_ctr_ptr, pid_n, rn, 1, N, stride_split,
                               0, 0, 1, SPLIT_LAST)
        if NORM_EPI == NORM_LAST:
            norm_epilogue(out_ptr, res_ptr, g_ptr, normed_ptr, counter_ptr, N, eps, NORM_BLOCK,
                          PTX)


@triton.jit
def _x2_words(w_words, row, koff, KW, EVEN_K: tl.constexpr):
    """The weight words of a tile's rows at word offsets ``koff`` (zeros past KW)."""
    if EVEN_K:
        w = tl.load(w_words + row + koff)
    else:
        w = tl.load(w_words + row + koff, mask=koff < KW, other=0)
    return w


@triton.jit
def _x2_step(acc, w, x_words, same, koff, KW, EVEN_K: tl.constexpr, PTX: tl.constexpr):
    """One K step of ``_gemv_e4m3_x2_kernel``: x's words at ``koff`` against ``w``."""
    if EVEN_K:
        x = tl.load(x_words + same + koff)
    else:
        x = tl.load(x_words + same + koff, mask=koff < KW, other=0)
    if PTX:
        acc = _dot4_e4m3_bf16x2(acc, w, x)
    else:
        acc = _dot4_e4m3_bf16_ref(acc, w, x)
    return acc


@triton.jit
def _x2_pre_k(k_lo, j: tl.constexpr, steps, kw, BLOCK_KW: tl.constexpr):
    """Word offsets of pre-loaded step ``j``: the program's last step where ``j`` is past it."""
    return k_lo + tl.minimum(j, steps - 1) * BLOCK_KW + kw


@triton.jit
def _x2_pre(acc, w, j: tl.constexpr, x_words, same, k_lo, steps, kw, KW, EVEN_K: tl.constexpr,
            BLOCK_KW: tl.constexpr, PTX: tl.constexpr):
    """``_x2_step`` on pre-loaded step ``j``'s words; acc unchanged (bitwise) where the
    program has fewer than ``j + 1`` steps."""
    out = _x2_step(acc, w, x_words, same, _x2_pre_k(k_lo, j, steps, kw, BLOCK_KW), KW, EVEN_K,
                   PTX)
    if j > 0:
        out = tl.where(j >= steps, acc, out)
    return out


@triton.jit
def _x2_load(w_words, x_words, tile, k_step, N, KW, stride_wn_words, i, total, kw,
             EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr):
    """The weight words of ``tile``'s rows and the x words of one K step, for the program's
    flat step ``i`` (nothing from ``i >= total``: the prefetch past its last step)."""
    row = tl.minimum(tile * BLOCK_N + tl.arange(0, BLOCK_N), N - 1).to(tl.int64)[:, None]
    koff = k_step * BLOCK_KW + kw
    same = tl.zeros([BLOCK_N, 1], dtype=tl.int32)  # x in the weight tile's layout
    ok = (same + i) < total
    if not EVEN_K:
        ok = ok & (koff < KW)
    w = tl.load(w_words + row * stride_wn_words + koff, mask=ok, other=0)
    x = tl.load(x_words + same + koff, mask=ok, other=0)
    return w, x


@triton.jit
def _gemv_e4m3_x2_stream_kernel(x_ptr, w_ptr, s_ptr, bias_ptr, out_ptr, N, KW,
                                stride_wn_words, num_tiles,
                                HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr,
                                BLOCK_N: tl.constexpr, BLOCK_KW: tl.constexpr,
                                PREFETCH: tl.constexpr, PTX: tl.constexpr,
                                USE_PDL: tl.constexpr):
    """``_gemv_e4m3_x2_kernel``'s arithmetic (same ``_dot4_e4m3_bf16x2`` per word), streamed:
    each of the G programs takes the tiles pid, pid + G, ... (BLOCK_N whole rows each) as one
    flat loop over their K steps, so a persistent grid (G a few programs an SM) never drains
    between tiles. PREFETCH: the next step's weight and x words are loaded before this step's
    arithmetic (a register double buffer, across tile boundaries too), so two steps of loads
    are in flight per program instead of one."""
    pdl_start(USE_PDL)
    pid, grid = tl.program_id(0), tl.num_programs(0)
    w_words = w_ptr.to(tl.pointer_type(tl.int32), bitcast=True)
    x_words = x_ptr.to(tl.pointer_type(tl.int64), bitcast=True)
    kw = tl.arange(0, BLOCK_KW)[None, :]
    steps = tl.cdiv(KW, BLOCK_KW)
    total = tl.cdiv(num_tiles - pid, grid) * steps
    acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
    if PREFETCH:
        w, x = _x2_load(w_words, x_words, pid, 0, N, KW, stride_wn_words, 0, total, kw,
                        EVEN_K, BLOCK_N, BLOCK_KW)
    tile, ks = pid, 0  # this step's tile and K step (counters: no division in the loop)
    for i in range(0, total):
        last = ks == steps - 1
        next_tile = tl.where(last, tile + grid, tile)
        next_ks = tl.where(last, 0, ks + 1)
        if PREFETCH:
            w_next, x_next = _x2_load(w_words, x_words, next_tile, next_ks, N, KW,
                                      stride_wn_words, i + 1, total, kw, EVEN_K, BLOCK_N,
                                      BLOCK_KW)
        else:
            w, x = _x2_load(w_words, x_words, tile, ks, N, KW, stride_wn_words, i, total, kw,
                            EVEN_K, BLOCK_N, BLOCK_KW)
        if PTX:
            acc = _dot4_e4m3_bf16x2(acc, w, x)
        else:
            acc = _dot4_e4m3_bf16_ref(acc, w, x)
        if PREFETCH:
            w, x = w_next, x_next
        if last:  # the tile's last K step: its outputs
            rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            y = _finish(tl.sum(acc, axis=1), s_ptr, bias_ptr, rn, N, 0, True, True, HAS_BIAS)
            tl.store(out_ptr + rn, y.to(out_ptr.dtype.element_ty), mask=rn < N)
            acc = tl.zeros((BLOCK_N, BLOCK_KW), dtype=tl.float32)
        tile, ks = next_tile, next_ks


def gemv_x2_config(n: int, k: int) -> tuple:
    """The launch shape for ``gemv_fp8_x2``: under ``TESSELLM_GEMV_SPLIT_LAST``
    (``split_last.ENABLED``) ``gemv_x2_table.SPLIT_TABLE``'s split where it holds the shape;
    else the measured table (``gemv_x2_table.X2_TABLE``, by exact (N, K)) where it holds it,
    else (weight rows a program, 32-bit words of K
    a step, warps) for ``_gemv_e4m3_x2_kernel``, from the H200 sweep
    (``benchmarks/results/h200-2026-11-21e/x2bench.json``, M = 1, CUDA graph, weights rotated
    past the L2): within 3% of the best of seven tiles on each shape swept, Llama-3.1-8B's qkv,
    o, gate_up, down and LM head, and qkv, o, down at TP 2 (gate_up at TP 2 was not swept)."""
    tuned = SPLIT_TABLE.get((n, k)) if split_last_enabled() else None
    if tuned is None:
        tuned = X2_TABLE.get((n, k))
    if tuned is not None:
        return tuned
    if n >= 65536:  # the LM head: 121.5 us
        return 8, 128, 4
    if n <= 4096 and k % 2048 == 0:  # o, down, qkv at TP=2: few rows, whole 512-word steps
        return 2, 512, 4
    return 4, 256, 4  # qkv, gate_up, down at TP=2 (K = 7168: 3.5 steps of 512 words)


def gemv_fp8_x2(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                bias: Optional[torch.Tensor] = None, config: Optional[tuple] = None,
                split_k: Optional[int] = None,
                split_last: Optional[bool] = None) -> torch.Tensor:
    """W8A16 for one row of bf16 x: ``x [1, K] @ (qweight * scales[:, None]).T (+ bias)``
    through ``_dot4_e4m3_bf16x2`` (pairs of products rounded to bf16 before a float32 sum).
    K a multiple of 4; ``qweight`` e4m3fn ``[N, K]`` row-major, ``scales`` float32 ``[N]``.
    ``config`` instead of ``gemv_x2_config``'s: (block_n, block_kw, num_warps) for
    ``_gemv_e4m3_x2_kernel`` (``split_k`` programs along K, default by ``_with_split``),
    (block_n, block_kw, num_warps, split) for it with that split, combined in the launch
    (``split_last.py``), or (block_n, block_kw, num_warps, programs_per_sm, prefetch) for the
    streamed kernel (programs_per_sm 0: one program a tile; no split). ``split_last``: whether
    a split K of a 3-tuple is combined in the launch (default ``split_last.ENABLED``) or in
    float32 planes summed by torch after it."""
    k = x.shape[1]
    n = qweight.shape[0]
    config = tuple(config or gemv_x2_config(n, k))
    x = _x2_checked(x, qweight)
    if len(config) == 5:
        return _stream(x, qweight, scales, bias, *config)
    if len(config) == 4:
        split_k, split_last = config[3], True
    block_n, block_kw, num_warps = config[:3]
    kw = k // 4
    if split_k is None:
        split_k = _with_split(GemvConfig(block_n, block_kw * 4, num_warps, 1), n, k,
                              1 if _interpreted(x) else _num_sms(x.device.index or 0)).split_k
    words_per_split = triton.cdiv(triton.cdiv(kw, block_kw), split_k) * block_kw
    split = triton.cdiv(kw, words_per_split)
    out = _split_out(x, 1, n, split)
    tiles = triton.cdiv(n, block_n)
    y = None
    if split > 1 and (split_last_enabled() if split_last is None else split_last):
        y = torch.empty(1, n, dtype=x.dtype, device=x.device)
        combine = split_last_args(y, tile_counters(x.device, qweight.data_ptr(), tiles), split,
                                  scales)
    else:
        combine = split_last_args(None, None, 0, scales)
    _gemv_e4m3_x2_kernel[(tiles, split)](
        x, qweight, scales, bias if bias is not None else scales, out, n, kw,
        qweight.stride(0) // 4, words_per_split, _split_stride(out), HAS_BIAS=bias is not None,
        EVEN_K=kw % words_per_split == 0, BLOCK_N=block_n, BLOCK_KW=block_kw, PTX=_ptx(x),
        SILU_FOLD=False, num_warps=num_warps, **epilogue_args(None, x),
        **_prewait(x, n, k, words_per_split // block_kw),
        **combine, **pdl_args(x.device))
    return y if y is not None else _split_sum(out, x.dtype)


def _prewait(x: torch.Tensor, n: int, k: int, steps: int) -> dict:
    """``prewait_args``, with ``gemv_x2_table.PREWAIT_TILES``' weight tiles for an ``[n, k]``
    weight under ``TESSELLM_GEMV_SPLIT_LAST``, at most a program's K ``steps`` (the sums are
    the same with any count)."""
    pre = prewait_args(x)
    tiles = PREWAIT_TILES.get((n, k)) if split_last_enabled() else None
    if tiles is not None:
        pre["PRE_TILES"] = min(tiles, max(1, steps))
    return pre


def gemv_fp8_x2_silu_and_mul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             bias: Optional[torch.Tensor] = None,
                             config: Optional[tuple] = None) -> torch.Tensor:
    """``silu_and_mul(gemv_fp8_x2(x, qweight, scales, bias))`` in one launch for a stacked
    ``[gate; up]`` e4m3fn weight ``[2I, K]`` (scales ``[2I]``): returns ``[1, I]``, bitwise what
    the two launches give. ``_gemv_e4m3_x2_kernel`` with SILU_FOLD on the tiles
    ``gemv_x2_config`` gives the ``[2I, K]`` product (block_n, block_kw, num_warps: a streamed
    table entry's first three), whole K a program (the epilogue needs both sums)."""
    n, k = qweight.shape
    block_n, block_kw, num_warps = tuple(config or gemv_x2_config(n, k))[:3]
    if n % 2 or block_n % 2:
        raise ValueError(f"gemv_fp8_x2_silu_and_mul: a stacked [gate; up] weight of an even row "
                         f"count and an even block_n, got {n} rows, block_n {block_n}")
    x = _x2_checked(x, qweight)
    kw = k // 4
    out = torch.empty(1, n // 2, dtype=x.dtype, device=x.device)
    _gemv_e4m3_x2_kernel[(triton.cdiv(n // 2, block_n // 2), 1)](
        x, qweight, scales, bias if bias is not None else scales, out, n // 2, kw,
        qweight.stride(0) // 4, kw, 0, HAS_BIAS=bias is not None,
        EVEN_K=kw % block_kw == 0, BLOCK_N=block_n, BLOCK_KW=block_kw, PTX=_ptx(x),
        SILU_FOLD=True, num_warps=num_warps, **epilogue_args(None, x), **prewait_args(x),
        **split_last_args(None, None, 0, x), **pdl_args(x.device))
    return out


def gemv_fp8_x2_then_add_rms_norm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                             residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                             bias: Optional[torch.Tensor] = None,
                             config: Optional[tuple] = None) -> tuple:
    """``fused_add_rms_norm(gemv_fp8_x2(x, qweight, scales, bias), residual, norm_weight,
    eps)`` in one launch (``norm_epilogue``): returns ``(normed [1, N], residual)``, the
    residual ``[1, N]`` updated in place, bitwise the two launches. The tiled kernel on
    ``gemv_x2_config``'s tiles (a streamed table entry's first three), whole K a program (the
    last program needs every output). ``norm_epilogue.norm_epilogue_applies`` must hold."""
    n, k = qweight.shape
    if not norm_epilogue_applies(x, n, residual, norm_weight):
        raise ValueError(f"gemv_fp8_x2_then_add_rms_norm: one row, a residual [1, {n}] of x's dtype "
                         f"and a norm weight [{n}] (at most {NORM_EPILOGUE_MAX_N} outputs); got "
                         f"x {tuple(x.shape)}, residual {tuple(residual.shape)} "
                         f"{residual.dtype}, weight {tuple(norm_weight.shape)}")
    block_n, block_kw, num_warps = tuple(config or gemv_x2_config(n, k))[:3]
    x = _x2_checked(x, qweight)
    kw = k // 4
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    norm = make_epilogue(x, qweight.data_ptr(), n, residual, norm_weight, eps)
    # the o / down tile (2 x 512 words): 32 registers a thread without the epilogue, 40 with
    # it (ptxas sm_90a, Triton 3.9), a quarter fewer programs an SM; capped at 32 it spills
    # nothing
    cap = {"maxnreg": 32} if (block_n, block_kw, num_warps) == (2, 512, 4) and _ptx(x) else {}
    _gemv_e4m3_x2_kernel[(triton.cdiv(n, block_n), 1)](
        x, qweight, scales, bias if bias is not None else scales, out, n, kw,
        qweight.stride(0) // 4, kw, 0, HAS_BIAS=bias is not None,
        EVEN_K=kw % block_kw == 0, BLOCK_N=block_n, BLOCK_KW=block_kw, PTX=_ptx(x),
        SILU_FOLD=False, num_warps=num_warps, **epilogue_args(norm, x), **prewait_args(x),
        **split_last_args(None, None, 0, x), **pdl_args(x.device), **cap)
    return norm.normed, residual


def _x2_checked(x: torch.Tensor, qweight: torch.Tensor) -> torch.Tensor:
    """x as the kernels read it (contiguous, 8-byte aligned), after checking both operands."""
    m, k = x.shape
    if m != 1 or x.dtype != torch.bfloat16 or qweight.dtype != torch.float8_e4m3fn:
        raise ValueError("gemv_fp8_x2: one bf16 row against e4m3fn weights")
    if (k % 4 or qweight.shape[1] != k or qweight.stride(1) != 1 or qweight.stride(0) % 4
            or qweight.data_ptr() % 4):
        raise ValueError(f"gemv_fp8_x2: weight must be row-major [N, {k}] with K and its row "
                         f"stride multiples of 4, got {tuple(qweight.shape)} {qweight.stride()}"
                         " (and 4-byte aligned)")
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 8 else x  # read as 64-bit words


def _stream(x, qweight, scales, bias, block_n: int, block_kw: int, num_warps: int,
            per_sm: int, prefetch: bool) -> torch.Tensor:
    """``_gemv_e4m3_x2_stream_kernel`` on min(tiles, per_sm x SMs) programs (all tiles if
    ``per_sm`` is 0)."""
    n, k = qweight.shape
    kw = k // 4
    tiles = triton.cdiv(n, block_n)
    grid = tiles
    if per_sm:
        grid = min(tiles, per_sm * (1 if _interpreted(x) else _num_sms(x.device.index or 0)))
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _gemv_e4m3_x2_stream_kernel[(grid,)](
        x, qweight, scales, bias if bias is not None else scales, out, n, kw,
        qweight.stride(0) // 4, tiles, HAS_BIAS=bias is not None, EVEN_K=kw % block_kw == 0,
        BLOCK_N=block_n, BLOCK_KW=block_kw, PREFETCH=bool(prefetch), PTX=_ptx(x),
        num_warps=num_warps, **pdl_args(x.device))
    return out
