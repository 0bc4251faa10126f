"""bitsandbytes 4-bit (NF4 / FP4) weights: dequantize in one Triton kernel, then the 16-bit GEMM.

The format (``quantization/bnb.py``): the weight's flattened values in blocks of ``BS``, codes two
a byte (first value in the high nibble), each value ``code[q] * absmax[j // BS]`` with ``code``
the 16-entry table of the type. One program widens ``BLOCK`` bytes into ``2 * BLOCK``
consecutive values of the dense ``[N, K]`` weight (x's dtype)::

    byte i  --> (i, 0): q = byte >> 4    j = 2i       out[j] = code[q] * absmax[j // BS]
            --> (i, 1): q = byte & 15    j = 2i + 1

a ``[BLOCK, 2]`` tile, so loads and the store are contiguous; the table (64 bytes) and absmax
come through the cache. ``bnb4_mm`` then lets cuBLAS multiply (``F.linear``), the form the int4
path takes from ``DEQUANT_MIN_M`` rows: one read of the codes, one write and one read of the
dense weight a product (~4.5 bytes a weight in 16 bits), the dense weight never kept. Float32
arithmetic then one rounding to x's dtype: the reference ``TorchQuantOps.bnb4_mm``'s
dequantization bit for bit.

Up to ``GEMV_MAX_M`` rows (decode) ``_bnb4_gemv_kernel`` reads the codes once for up to
``GEMV_ROWS`` x rows a launch (more rows: a launch per ``GEMV_ROWS``). K % BS == 0 (every
checkpoint's layer; else the dequantization path), so row n's absmax are ``n * K/BS + kb``. A
program takes ``BLOCK_N`` output rows and walks its K range (``SPLIT_K`` ranges; float32
planes summed after, ``common._split_sum``) in steps of ``BKB`` blocks, a ``[BLOCK_N, BKB,
BS/2]`` tile of bytes (``BKB * BS / 2`` contiguous bytes a row a step)::

    byte   [BLOCK_N, BKB, BS/2]   one load, 8-byte vectors (a row's K/2 bytes: 8-aligned)
    s      [BLOCK_N, BKB, 1]      the block's absmax: one load a block, broadcast
    w_hi = code[byte >> 4] * s,  w_lo = code[byte & 15] * s     (the table through L1)
    x_hi, x_lo                    x[r, kb*BS + 2i], x[r, kb*BS + 2i + 1] (from L1)
    acc_r += w_hi * x_hi + w_lo * x_lo                          per row r, in float32

reduced once at the end (``common._gemv_rows_epilogue``). The weights are not rounded to x's
dtype one by one as the dequantized matrix is: the result is the reference's to float32
reassociation (float32 x) or to the weights' rounding (16-bit x). Launch shapes: one table,
``GEMV_CONFIGS`` (``benchmarks/kernels/bench_bnb4_sweep.py`` prints the one its numbers
imply). sm90 compile without a GPU (``bench_bnb4_aot.py``, Triton 3.9): the default entries
take 145 registers at 1 row (16 x 8 blocks, x converted) and 247 at 4 (x tiles), no spills.

Variants (constexprs, a ``GEMV_CONFIGS`` entry's keys; ``bench_bnb4_sweep.py`` times them).
What each does to a thread's loads a step, from the sm90 PTX of a 16 x 8-block tile at one row
(32 code bytes a thread): ``LUT`` 0 (``t16``) two 4-byte loads of the 16-entry table a byte
(64; one L1 line: one wavefront each); 2 (``pair``) one 8-byte load of ``pair_table``'s 256
entries a byte (32, but a warp's 32 lookups fall on up to 16 lines); 1 (``gather``)
``tl.gather`` from the codes held in registers (lowered to ~170 more warp shuffles and shared
memory round trips). ``X_WORDS``: 16-bit x read as 32-bit words, both inputs of a byte in
one (X_TILE: 8 16-byte loads for 64 2-byte ones). ``WIDE_Q``: the codes' row stride passed
as an argument, which Triton specializes as 16-aligned, so the codes come in 16-byte
vectors (2 loads for 4). ``SPLIT_LAST``: split K's planes added by each N tile's last
program (``split_last.py``) instead of torch's sum and cast after the launch (two kernels).
Which of them lifts the GEMV towards ~2 TB/s is the sweep's to say (the defaults stay the
session-28 kernel until it has).

``GEMV_MAX_M`` is 2, ``GEMV_CONFIGS`` as ``bench_bnb4_sweep.py`` chose them on an H100
(session 28, us a call, L2 flushed, Llama-8B shapes; GEMV / dequant+cuBLAS / bf16 cuBLAS):
1 row qkv 17.1 / 45.1 / 24.7, o 16.0 / 29.6 / 18.3, gate_up 67.8 / 210.8 / 91.5 (the codes
at 0.6-1.0 TB/s); 2 rows qkv 31.5 / 46.1, o 18.3 / 29.1, gate_up 102.4 / 211.3; at 4 rows the
two paths tie (qkv 53.7 / 45.6, gate_up 182.2 / 211.0), so the dequantize path from 3 rows.
The first GEMV (a program a row of x and 16 output rows, 128 bytes a row a step, absmax
gathered a value) read at 0.23-0.33 TB/s, slower than dequantizing. At B1 (Llama-8B shapes,
engine, graphs) bnb 4-bit decodes at 5.28 ms a token against bf16's 5.26 on that H100: the
GEMV's ~0.9 TB/s of 4.5-bit weights matches cuBLAS's bf16 rate; to be faster it must read at
~2 TB/s or more (the variants above).
"""

from __future__ import annotations

import weakref
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (_gemv_rows_epilogue, _interpreted, _num_sms,
                                          _split_out, _split_stride, _split_sum)
from tessellm.kernels.gemm.split_last import split_last_args, split_last_combine, tile_counters
from tessellm.quantization.bnb import Bnb4Weight

BLOCK = 1024  # bytes a program (2048 weights)
GEMV_MAX_M = 2  # rows up to which bnb4_mm takes the GEMV (H100 sweeps, sessions 28 and 29)
GEMV_ROWS = 4  # x rows a GEMV launch (one accumulator tile each)
# Launch shapes of the GEMV by rows (the smallest key >= M): output rows a program, blocks of
# BS a step, warps, pipeline stages, the most K splits (split while the grid has under
# PROGRAMS_PER_SM programs a multiprocessor and each split keeps MIN_STEPS steps), and how x
# is loaded (``_bnb4_row_step``), the table lookup (``LUT``, ``_bnb4_weights``), x read as
# 32-bit words (``X_WORDS``), the codes' row stride passed for 16-byte loads (``WIDE_Q``) and
# split K's planes added by each tile's last program (``SPLIT_LAST``) rather than torch.
# bench_bnb4_sweep.py prints the table to set.
GEMV_CONFIGS = {  # H100 sweep, session 29 (x as words: o 15.0 -> 11.4 us, down 40.8 -> 35.8)
    1: dict(BLOCK_N=8, BKB=16, num_warps=4, num_stages=3, max_split=16, X_TILE=False, LUT=0,
            X_WORDS=True, WIDE_Q=True, SPLIT_LAST=True),
    2: dict(BLOCK_N=8, BKB=8, num_warps=4, num_stages=3, max_split=16, X_TILE=False, LUT=0,
            X_WORDS=True, WIDE_Q=False, SPLIT_LAST=False),
    4: dict(BLOCK_N=16, BKB=8, num_warps=4, num_stages=3, max_split=1, X_TILE=True, LUT=0,
            X_WORDS=False, WIDE_Q=False, SPLIT_LAST=False),
}
# The GEMV's ways to look the codes up (``_bnb4_weights``): two loads of the 16-entry table,
# tl.gather from registers, one 8-byte load of the 256-entry pair table.
LUTS = {"t16": 0, "gather": 1, "pair": 2}
PROGRAMS_PER_SM = 4
MIN_STEPS = 2
# The interpreter (no GPU): its cost is per program (each nested jit call re-patches Triton's
# builtins), not per element, so 32 output rows a program; 2 blocks a step and a K split of
# 2 keep the steps, tails and splits of a small K (tests/quantization/test_bnb.py).
_INTERPRETED_CONFIG = dict(BLOCK_N=32, BKB=2, num_warps=1, num_stages=1, max_split=2, X_TILE=True,
                           LUT=0, X_WORDS=False, WIDE_Q=False, SPLIT_LAST=False)
# pair_table's tables: id(code) -> (a weak reference to code, code's version, the table)
_PAIRS: dict = {}


@triton.jit
def _bnb4_dequant_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes,
                         BS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_bytes
    byte = tl.load(q_ptr + i, mask=ok, other=0).to(tl.int32)
    half = tl.arange(0, 2)
    nib = tl.where(half[None, :] == 0, byte[:, None] >> 4, byte[:, None] & 15)  # [BLOCK, 2]
    j = 2 * i[:, None] + half[None, :]
    ok2 = ok[:, None] & (half[None, :] < 2)
    code = tl.load(code_ptr + nib, mask=ok2, other=0.0)
    scale = tl.load(absmax_ptr + j // BS, mask=ok2, other=0.0)
    tl.store(out_ptr + j, (code * scale).to(out_ptr.dtype.element_ty), mask=ok2)


def bnb4_dequantize(w: Bnb4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype``."""
    q = w.qweight.contiguous()
    out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=q.device)
    n_bytes = q.numel()
    _bnb4_dequant_kernel[(triton.cdiv(n_bytes, BLOCK),)](q, w.absmax, w.code, out, n_bytes,
                                                         BS=w.blocksize, BLOCK=BLOCK)
    return out


@triton.jit
def _bnb4_gemv_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, y_ptr,
                      split_ctr_ptr, N, K, stride_q, stride_xm, stride_om, stride_split, SPLIT_K,
                      BS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BKB: tl.constexpr, EVEN_K: tl.constexpr,
                      X_TILE: tl.constexpr, LUT: tl.constexpr, X_WORDS: tl.constexpr,
                      WIDE_Q: tl.constexpr, SPLIT_LAST: tl.constexpr):
    """Grid ``(N / BLOCK_N, SPLIT_K)``; ``ROWS`` x rows (1..4); K % BS == 0. EVEN_K: every
    program's block range is whole ``BKB`` steps inside K (no K mask). ``code_ptr``: the
    16-entry table (LUT 0, 1) or ``pair_table``'s 256 pairs (LUT 2); ``stride_q``: the codes'
    row stride in bytes (K/2), used where WIDE_Q (Triton then knows it 16-aligned when it is).
    SPLIT_LAST (> 0: SPLIT_K): each N tile's last program adds the planes into ``y_ptr``
    (``split_last.split_last_combine``) instead of torch after the launch."""
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row = tl.minimum(rn, N - 1).to(tl.int64)[:, None, None]  # past N: row N-1, not stored
    HB: tl.constexpr = BS // 2
    # x as 32-bit words of two inputs: 0 no (float32 x or X_WORDS off), 1 bf16, 2 fp16
    WORDS: tl.constexpr = (0 if not X_WORDS or x_ptr.dtype.element_ty == tl.float32 else
                           1 if x_ptr.dtype.element_ty == tl.bfloat16 else 2)
    KB = K // BS
    span = tl.cdiv(tl.cdiv(KB, BKB), SPLIT_K) * BKB
    kb_lo = pid_k * span
    kb_hi = tl.minimum(kb_lo + span, KB)
    blk = tl.arange(0, BKB)[None, :, None]
    i = tl.arange(0, HB)[None, None, :]
    acc0 = tl.zeros((BLOCK_N, BKB, HB), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BKB, HB), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BKB, HB), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BKB, HB), dtype=tl.float32)
    q_row = q_ptr + row * (stride_q if WIDE_Q else K // 2) + i
    s_row = absmax_ptr + row * KB
    table = tl.zeros((BLOCK_N, BKB, 16), dtype=tl.float32)
    if LUT == 1:  # the 16 codes in registers, for tl.gather
        table += tl.load(code_ptr + tl.arange(0, 16))[None, None, :]
    if WORDS:  # [BKB, HB] 32-bit words: inputs 2i (low half), 2i + 1 (high half)
        x_base = x_ptr.to(tl.pointer_type(tl.int32))
        x_off = tl.arange(0, BKB)[:, None] * HB + tl.arange(0, HB)[None, :]
        x_step, x_row = HB, stride_xm // 2
    else:  # [BKB, HB]: input 2i (its byte's high nibble), 2i + 1 next (``_bnb4_row_step``)
        x_base = x_ptr
        x_off = tl.arange(0, BKB)[:, None] * BS + 2 * tl.arange(0, HB)[None, :]
        x_step, x_row = BS, stride_xm
    for kb0 in range(kb_lo, kb_hi, BKB):
        kb = kb0 + blk
        if EVEN_K:
            byte = tl.load(q_row + kb * HB).to(tl.int32)
            s = tl.load(s_row + kb)
        else:
            byte = tl.load(q_row + kb * HB, mask=kb < kb_hi, other=0).to(tl.int32)
            s = tl.load(s_row + kb, mask=kb < kb_hi, other=0.0)
        w_hi, w_lo = _bnb4_weights(code_ptr, table, byte, s, LUT)
        xr = x_base + kb0 * x_step + x_off
        acc0 = _bnb4_row_step(acc0, w_hi, w_lo, xr, kb0, kb_hi, BS, BKB, EVEN_K, X_TILE, WORDS)
        if ROWS > 1:
            acc1 = _bnb4_row_step(acc1, w_hi, w_lo, xr + x_row, kb0, kb_hi, BS, BKB, EVEN_K,
                                  X_TILE, WORDS)
        if ROWS > 2:
            acc2 = _bnb4_row_step(acc2, w_hi, w_lo, xr + 2 * x_row, kb0, kb_hi, BS, BKB,
                                  EVEN_K, X_TILE, WORDS)
        if ROWS > 3:
            acc3 = _bnb4_row_step(acc3, w_hi, w_lo, xr + 3 * x_row, kb0, kb_hi, BS, BKB,
                                  EVEN_K, X_TILE, WORDS)
    _gemv_rows_epilogue(tl.sum(acc0, axis=2), tl.sum(acc1, axis=2), tl.sum(acc2, axis=2),
                        tl.sum(acc3, axis=2), out_ptr, bias_ptr, rn, N, stride_om, stride_split,
                        pid_k, HAS_BIAS, ROWS, AXIS=1)
    if SPLIT_LAST > 0:
        split_last_combine(out_ptr, y_ptr, split_ctr_ptr, pid_n, rn, ROWS, N, stride_split,
                           stride_om, stride_om, ROWS, SPLIT_LAST)


@triton.jit
def _bnb4_weights(code_ptr, table, byte, s, LUT: tl.constexpr):
    """A step's weights ``code[byte >> 4] * s``, ``code[byte & 15] * s`` (float32): LUT 0 two
    loads of the 16-entry table (through L1), 1 ``tl.gather`` from ``table`` (the codes in
    registers, broadcast over the tile), 2 one 8-byte load of ``pair_table``'s entry ``byte``
    (both float32 weights' bits: the first in the low word)."""
    if LUT == 0:
        return tl.load(code_ptr + (byte >> 4)) * s, tl.load(code_ptr + (byte & 15)) * s
    elif LUT == 1:
        return tl.gather(table, byte >> 4, axis=2) * s, tl.gather(table, byte & 15, axis=2) * s
    else:
        pair = tl.load(code_ptr + byte)
        w_hi = pair.to(tl.int32).to(tl.float32, bitcast=True)
        w_lo = (pair >> 32).to(tl.int32).to(tl.float32, bitcast=True)
        return w_hi * s, w_lo * s


@triton.jit
def _bnb4_row_step(acc, w_hi, w_lo, xr, kb0, kb_hi, BS: tl.constexpr, BKB: tl.constexpr,
                   EVEN_K: tl.constexpr, X_TILE: tl.constexpr, WORDS: tl.constexpr):
    """acc ``[BLOCK_N, BKB, BS/2]`` += one x row's products with the step's weights: its even
    (high nibble) and odd inputs from ``xr`` (``[BKB, BS/2]``, the even ones' addresses, or
    WORDS 1 / 2: the 32-bit words holding both, bf16 / fp16, the even input in the low half:
    one vector load for both).
    X_TILE: loaded as whole ``[BLOCK_N, BKB, BS/2]`` tiles (the pointers broadcast along N), so
    Triton lays them out as the codes (scalar loads, L1 hits, no conversion); else loaded
    ``[BKB, BS/2]`` and expanded (fewer loads; Triton converts them to the codes' layout
    through shared memory every step). A ``[.., 2]`` tile split in two made Triton convert
    the weight tiles instead."""
    if X_TILE:
        xr = tl.broadcast_to(xr[None, :, :], w_hi.shape)
        ok = kb0 + tl.arange(0, BKB)[None, :, None] < kb_hi
    else:
        ok = kb0 + tl.arange(0, BKB)[:, None] < kb_hi
    if WORDS:
        if EVEN_K:
            word = tl.load(xr)
        else:
            word = tl.load(xr, mask=ok, other=0)
        if WORDS == 1:  # bf16: a float32's high half
            x_hi = (word << 16).to(tl.float32, bitcast=True)
            x_lo = (word & -65536).to(tl.float32, bitcast=True)
        else:
            x_hi = word.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            x_lo = (word >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    elif EVEN_K:
        x_hi = tl.load(xr).to(tl.float32)
        x_lo = tl.load(xr + 1).to(tl.float32)
    else:
        x_hi = tl.load(xr, mask=ok, other=0.0).to(tl.float32)
        x_lo = tl.load(xr + 1, mask=ok, other=0.0).to(tl.float32)
    if not X_TILE:
        x_hi = x_hi[None, :, :]
        x_lo = x_lo[None, :, :]
    return acc + w_hi * x_hi + w_lo * x_lo



def gemv_config(m: int, n: int, k: int, blocksize: int, interpreted: bool,
                num_sms: int = 132, config: Optional[dict] = None) -> dict:
    """The launch of ``m`` (<= ``GEMV_ROWS``) rows: ``config`` (the sweep's) or
    ``GEMV_CONFIGS``' entry, the steps cut to K, K split in powers of two while the grid has
    under ``PROGRAMS_PER_SM`` programs a multiprocessor and each split keeps ``MIN_STEPS``
    steps (by shape alone: graph-capture safe)."""
    if config is None:
        config = (_INTERPRETED_CONFIG if interpreted else
                  GEMV_CONFIGS[min(r for r in GEMV_CONFIGS if r >= min(m, max(GEMV_CONFIGS)))])
    c = dict(LUT=0, X_WORDS=False, WIDE_Q=False, SPLIT_LAST=False)  # older tables' entries
    c.update(config)
    max_split = c.pop("max_split")
    kb = k // blocksize
    c["BKB"] = min(c["BKB"], triton.next_power_of_2(kb))
    tiles_n = triton.cdiv(n, c["BLOCK_N"])
    steps = triton.cdiv(kb, c["BKB"])
    split = 1
    while (split * 2 <= max_split and tiles_n * split * 2 <= PROGRAMS_PER_SM * num_sms
           and steps // (split * 2) >= MIN_STEPS):
        split *= 2
    c["SPLIT_K"] = split
    c["EVEN_K"] = kb % c["BKB"] == 0 and steps % split == 0
    c["grid"] = (tiles_n, split)
    return c


def pair_table(code: torch.Tensor) -> torch.Tensor:
    """int64 ``[256]``: entry b holds ``code[b >> 4]`` (low word) and ``code[b & 15]`` (high
    word) as float32 bits, the GEMV's LUT 2. Made once per table tensor and version (an
    in-place load into ``code`` makes it anew), dropped with the tensor; outside graph capture
    in the engine (its warm-up runs each shape eagerly first). A table made under
    ``torch.inference_mode`` (weights woken or reloaded there) has no version to watch: its
    pairs are made each call."""
    if code.is_inference():
        return _pairs(code)
    ref, version, pairs = _PAIRS.get(id(code), (None, None, None))
    if ref is None or ref() is not code or version != code._version:
        if ref is None or ref() is not code:
            weakref.finalize(code, _PAIRS.pop, id(code), None)
        pairs = _pairs(code)
        _PAIRS[id(code)] = (weakref.ref(code), code._version, pairs)
    return pairs


def _pairs(code: torch.Tensor) -> torch.Tensor:
    b = torch.arange(256, device=code.device)
    both = torch.stack([code[b >> 4], code[b & 15]], dim=1).float().contiguous()
    return both.view(torch.int64).reshape(256)


def gemv_fits(w: Bnb4Weight) -> bool:
    """Whether the GEMV takes ``w``: whole blocks a row (every checkpoint layer's K)."""
    return w.in_features % w.blocksize == 0 and w.blocksize % 2 == 0


def bnb4_gemv(x: torch.Tensor, w: Bnb4Weight, bias=None, config: Optional[dict] = None
              ) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` reading the codes once a ``GEMV_ROWS`` x rows
    (decode). ``config``: a ``GEMV_CONFIGS`` entry to launch instead (the sweep)."""
    if not gemv_fits(w):
        raise ValueError(f"the bnb4 GEMV needs whole blocks a row: K={w.in_features} is not a "
                         f"multiple of the block size {w.blocksize}; use bnb4_mm (it "
                         "dequantizes such weights)")
    x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    interp = _interpreted(x)
    outs = []
    for r0 in range(0, m, GEMV_ROWS):
        xr = x[r0:r0 + GEMV_ROWS]
        rows = xr.shape[0]
        t = gemv_config(rows, n, k, w.blocksize, interp,
                        1 if interp else _num_sms(x.device.index or 0), config)
        grid = t.pop("grid")
        t["X_WORDS"] = t["X_WORDS"] and xr.data_ptr() % 4 == 0  # words: 4-byte aligned
        out = _split_out(x, rows, n, t["SPLIT_K"])
        y, combine = None, split_last_args(None, None, 0, x)
        if t.pop("SPLIT_LAST") and t["SPLIT_K"] > 1:  # planes added by each tile's last
            y = torch.empty(rows, n, dtype=x.dtype, device=x.device)
            combine = split_last_args(y, tile_counters(x.device, w.qweight.data_ptr(), grid[0]),
                                      t["SPLIT_K"], x)
        code = pair_table(w.code) if t["LUT"] == LUTS["pair"] else w.code
        _bnb4_gemv_kernel[grid](
            xr, w.qweight, w.absmax, code, bias if bias is not None else x, out,
            combine.pop("y_ptr"), combine.pop("split_ctr_ptr"), n, k, w.qweight.stride(0),
            xr.stride(0), out.stride(-2), _split_stride(out), BS=w.blocksize,
            HAS_BIAS=bias is not None, ROWS=rows, **combine, **t)
        outs.append(y if y is not None else _split_sum(out, x.dtype))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def bnb4_mm(x: torch.Tensor, w: Bnb4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` in x's dtype: the GEMV up to ``GEMV_MAX_M`` rows,
    else the dequantization kernel, then ``F.linear``."""
    if 0 < x.shape[0] <= GEMV_MAX_M and gemv_fits(w):
        return bnb4_gemv(x, w, bias)
    return F.linear(x, bnb4_dequantize(w, x.dtype), bias)
