"""Paged attention in Triton: cache write (with NeoX rotary fused in), varlen prefill,
split-KV decode.

KV cache layout (see ``backends/spec.py``): ``k_cache``/``v_cache`` ``[num_blocks, block_size,
KVH, D]``. Token ``t`` of sequence ``s`` lives at block ``block_tables[s, t // block_size]``,
offset ``t % block_size``::

    block_tables[s] = [7, 2, 9]       block_size = 4, seq_len = 10
    tokens 0..3 -> block 7, 4..7 -> block 2, 8..9 -> block 9 (offsets 0, 1)

The flat batch holds decode sequences first (one query each), then prefill chunks. Query ``i``
of sequence ``s`` sits at position ``seq_lens[s] - query_len(s) + i`` and sees keys ``<=`` it
(and ``> pos - window`` with a sliding window).

GQA: one program handles all ``G = H / KVH`` query heads of one KV head, packed as rows of a
``[BLOCK_M, D]`` tile (``row = query * G_P2 + g``), so every K/V tile is loaded once per group.

Decode is split-KV: grid ``(num_decodes, KVH, num_splits)`` with ``num_splits`` a host int
fixed per batch size (graph-capture safe). A sequence of length L is cut into parts of
``max(roundup(cdiv(L, num_splits), BLOCK_N), MIN_PART)`` keys, computed in the kernel from
``seq_lens``; splits past L are empty and write (out=0, m=-1e30, l=0), which the reduction
weighs as zero. A sequence of length 0 (graph padding) gives output 0, never NaN.
With one split (large batches) the split kernel writes the output itself (``fused_reduce``);
with more, ``_decode_reduce_kernel`` combines the partials in a second launch. (Reducing in the
last split program to finish, through per-(sequence, KV head) atomic counters, was tried and
measured slower at batch 1 on an H200: 4.54 against 4.34 ms per token for Llama-8B shapes; the
counters' registers and the serial tail cost more than the launch they save.)
No host-device sync anywhere in ``forward``.

Cache write: one program per token writes its k and v at ``slot_mapping`` (-1: skipped). When
the model hands over the rotary inputs (``fuses_rotary``), the same program first NeoX-rotates
the token's q heads in place (padding rows with slot -1 too) and rotates k on its way to the
cache (``rotary_and_cache``), with ``TritonOps.rotary_embedding``'s rounding: one launch per
layer instead of two. Prefill and decode read k only from the cache, never from ``k``.

fp8 KV cache (``kv_cache_dtype="fp8"``): the cache holds e4m3 values ``k / k_scale`` and
``v / v_scale`` (per-tensor scales, host floats on the kernel, 1.0 unless set); the cache write
divides and saturates at +-448, the attention kernels widen each tile and fold the scales in:
``k_scale`` into the softmax scale, ``v_scale`` into the output normalisation.

How an e4m3 tile is widened matters more than the bytes it saves (``FP8_PTX``). Left to
Triton, ``v.to(bf16)`` is moved past the shared-memory staging of the dot: V (``[keys, D]``,
D contiguous) is the dot's right operand with its reduction dim strided, which 16-bit tiles
read with ``ldmatrix.trans`` but 8-bit tiles only byte by byte (``ld.shared.b8``, bank
conflicts). On sm89+ NVIDIA GPUs each tile is therefore widened in registers right after its
load, by ``cvt.rn.f16x2.e4m3x2`` in inline PTX (opaque to Triton, so it stays there), and the
dots run in fp16: e4m3 is exact in fp16, q enters pre-multiplied by the softmax scale (fp16
holds q * scale up to 65504: |q| up to ~5e5 at head size 128 and k_scale 1), and P in fp16
keeps three more mantissa bits than in bf16::

    q16 = fp16(q * scale_log2)          once per program
    s   = dot(q16, fp16(k8)^T)          k8: the e4m3 tile, widened in registers
    acc = acc * alpha + dot(fp16(p), fp16(v8))

Elsewhere (float32 q, e4m3fnuz, the CPU interpreter) tiles widen with ``.to(q.dtype)``.
``fp8_convert`` selects another way for tests and benchmarks: "triton" (the ``.to`` path) or
"bits" (``e4m3_to_16bit``, no conversion unit; measured slower than "cvt" here). H200, batch
256, Llama-8B heads, one layer: 236 us with "triton", 201 with "cvt", 210 with the bf16 cache
(benchmarks/quantization/README.md).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.backends.cuda.pdl import pdl_args, pdl_start

from tessellm.backends.cuda.quant_kernels import e4m3_to_16bit
from tessellm.backends.cuda.triton_ops import rope_halves, rotate_heads

_LOG2E = 1.4426950408889634
_NEG_BIG = tl.constexpr(-1.0e30)  # running-max start: finite, so masked tiles never give inf - inf


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _reshape_and_cache_kernel(k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                              stride_kt, stride_kh, stride_vt, stride_vh,
                              stride_kcb, stride_kct, stride_kch,
                              stride_vcb, stride_vct, stride_vch,
                              inv_k_scale, inv_v_scale,
                              NUM_KV_HEADS: tl.constexpr, KVH_P2: tl.constexpr,
                              HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              FP8: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P2)[:, None]
    d = tl.arange(0, HEAD_SIZE)[None, :]
    mask = h < NUM_KV_HEADS
    k = tl.load(k_ptr + t * stride_kt + h * stride_kh + d, mask=mask)
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:  # scale, then saturate: e4m3 has no infinity
        k = tl.minimum(tl.maximum(k.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -FP8_MAX), FP8_MAX)
    tl.store(kc_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + d,
             k.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_and_cache_kernel(pos_ptr, cos_sin_ptr, q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, slot_ptr,
                             stride_cs, stride_qt, stride_qh, stride_kt, stride_kh,
                             stride_vt, stride_vh, stride_kcb, stride_kct, stride_kch,
                             stride_vcb, stride_vct, stride_vch, inv_k_scale, inv_v_scale,
                             NUM_HEADS: tl.constexpr, HEADS_P2: tl.constexpr,
                             NUM_KV_HEADS: tl.constexpr, KVH_P2: tl.constexpr,
                             HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                             FP8: tl.constexpr, FP8_MAX: tl.constexpr, USE_PDL: tl.constexpr):
    """One token per program: NeoX-rotates its q heads in place (slot -1 too), then writes its
    rotated k and its v to the caches at its slot (none for slot -1). ``k`` itself is read only.
    Rounds like ``TritonOps.rotary_embedding`` followed by ``_reshape_and_cache_kernel``."""
    pdl_start(USE_PDL)
    HALF: tl.constexpr = HEAD_SIZE // 2
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t).to(tl.int64)
    j = tl.arange(0, HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + j)
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + j)
    rotate_heads(q_ptr, t, stride_qt, stride_qh, cos, sin, NUM_HEADS, HEADS_P2, HALF, HALF)

    slot = tl.load(slot_ptr + t).to(tl.int64)
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    h = tl.arange(0, KVH_P2)[:, None]
    mask = h < tl.where(slot >= 0, NUM_KV_HEADS, 0)  # slot -1: no head is written
    k_ptrs = k_ptr + t * stride_kt + h * stride_kh + j[None, :]
    k1, k2 = rope_halves(tl.load(k_ptrs, mask=mask, other=0.0),
                         tl.load(k_ptrs + HALF, mask=mask, other=0.0),
                         cos[None, :], sin[None, :], k_ptr.dtype.element_ty)
    if FP8:  # scale, then saturate: e4m3 has no infinity
        k1 = tl.minimum(tl.maximum(k1.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
        k2 = tl.minimum(tl.maximum(k2.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
    kc_ptrs = kc_ptr + blk * stride_kcb + off * stride_kct + h * stride_kch + j[None, :]
    tl.store(kc_ptrs, k1.to(kc_ptr.dtype.element_ty), mask=mask)
    tl.store(kc_ptrs + HALF, k2.to(kc_ptr.dtype.element_ty), mask=mask)

    d = tl.arange(0, HEAD_SIZE)[None, :]
    v = tl.load(v_ptr + t * stride_vt + h * stride_vh + d, mask=mask)
    if FP8:
        v = tl.minimum(tl.maximum(v.to(tl.float32) * inv_v_scale, -FP8_MAX), FP8_MAX)
    tl.store(vc_ptr + blk * stride_vcb + off * stride_vct + h * stride_vch + d,
             v.to(vc_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _e4m3_to_f16(x):
    """e4m3 -> fp16 in registers, 4 values per 32-bit word (exact). Inline PTX, not marked pure:
    Triton keeps it where it stands instead of moving it into the dot's operand loads."""
    return tl.inline_asm_elementwise(
        "{ .reg .b16 lo, hi;\n"
        "mov.b32 {lo, hi}, $2;\n"
        "cvt.rn.f16x2.e4m3x2 $0, lo;\n"
        "cvt.rn.f16x2.e4m3x2 $1, hi; }",
        "=r,=r,r", [x.to(tl.uint8, bitcast=True)], dtype=tl.float16, is_pure=False, pack=4)


@triton.jit
def _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok, mask, kvh,
                 scale_log2, stride_cb, stride_ct, stride_ch,
                 HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr,
                 APPLY_MASK: tl.constexpr, FP8_PTX: tl.constexpr):
    """One online-softmax step over keys ``n`` (``[BLOCK_N]``). ``mask``: ``[BLOCK_M, BLOCK_N]``,
    applied only when APPLY_MASK (tiles every row sees whole skip the select). FP8_PTX: the
    cache is e4m3 and ``q`` fp16, pre-scaled by the caller."""
    d = tl.arange(0, HEAD_SIZE)
    blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    kv_off = blk * stride_cb + (n % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    k = tl.load(k_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    if FP8_PTX == 1:
        k = _e4m3_to_f16(k)
    elif FP8_PTX == 2:
        k = e4m3_to_16bit(k, False, False)
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PREC) * scale_log2
    if APPLY_MASK:
        s = tl.where(mask, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(v_cache_ptr + kv_off[:, None] + d[None, :], mask=n_ok[:, None], other=0.0)
    if FP8_PTX == 1:
        v = _e4m3_to_f16(v)
    elif FP8_PTX == 2:
        v = e4m3_to_16bit(v, False, False)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
                    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
                    seq_offset, scale_log2, v_scale, window,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_bt,
                    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                    DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr):
    """Grid ``(num_prefills, cdiv(max_query_len, BLOCK_Q), KVH)``; BLOCK_M = BLOCK_Q * GROUP_P2."""
    s = seq_offset + tl.program_id(0)
    qb = tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx_len = seq_len - q_len

    rows = tl.arange(0, BLOCK_M)
    tq = qb * BLOCK_Q + rows // GROUP_P2  # query index inside the sequence
    g = rows % GROUP_P2
    row_ok = (tq < q_len) & (g < GROUP)
    d = tl.arange(0, HEAD_SIZE)
    tok = (q_start + tq).to(tl.int64)
    head = kvh * GROUP + g
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + d[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = scale_log2
    if FP8_PTX != 0:  # fp16 dots on widened e4m3 tiles; q pre-scaled (module docstring)
        q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        qk_scale = 1.0
    elif DOT_FP32:  # tiles take q's dtype
        q = q.to(tl.float32)
    q_pos = ctx_len + tq

    hi = tl.minimum(seq_len, ctx_len + (qb + 1) * BLOCK_Q)
    lo = 0
    if USE_WINDOW:
        lo = tl.maximum(ctx_len + qb * BLOCK_Q - window + 1, 0)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    # Keys < mid are <= the block's first query position, so causally visible to every row:
    #   keys:  lo ...... mid ..... hi      (mid - lo: whole BLOCK_N tiles)
    #          no mask   | causal mask
    mid = lo + (ctx_len + qb * BLOCK_Q + 1 - lo) // BLOCK_N * BLOCK_N
    for n0 in range(lo, mid, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < mid
        mask = n_ok[None, :]
        if USE_WINDOW:
            mask = mask & (n[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, USE_WINDOW, FP8_PTX)
    for n0 in range(mid, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        mask = (n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if USE_WINDOW:
            mask = mask & (n[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, True, FP8_PTX)
    acc = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr,
                         part_l_ptr, query_start_loc_ptr, seq_lens_ptr,
                         block_tables_ptr, scale_log2, v_scale, window,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_cb, stride_ct, stride_ch, stride_bt,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_PART: tl.constexpr,
                         BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
                         DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr,
                         REDUCE: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid ``(num_decodes, KVH, NUM_SPLITS)``. Each split's normalized partial output, running
    max (log2 units) and sum of exponentials go where ``REDUCE`` says (``_REDUCE_*``): to the
    workspace for ``_decode_reduce_kernel`` (SEPARATE), or straight to ``out`` (DIRECT, one
    split)."""
    pdl_start(USE_PDL)
    s = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    tok = tl.load(query_start_loc_ptr + s).to(tl.int64)
    part = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    part = tl.maximum(part, MIN_PART)
    start = split * part
    end = tl.minimum(start + part, seq_len)
    if USE_WINDOW:
        start = tl.maximum(start, seq_len - window)

    g = tl.arange(0, BLOCK_M)
    row_ok = g < GROUP
    head = kvh * GROUP + g
    d = tl.arange(0, HEAD_SIZE)
    q = tl.load(q_ptr + (tok * stride_qt + head * stride_qh)[:, None] + d[None, :],
                mask=row_ok[:, None], other=0.0)
    qk_scale = scale_log2
    if FP8_PTX != 0:  # fp16 dots on widened e4m3 tiles; q pre-scaled (module docstring)
        q = (q.to(tl.float32) * scale_log2).to(tl.float16)
        qk_scale = 1.0
    elif DOT_FP32:  # tiles take q's dtype
        q = q.to(tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        mask = (g[:, None] >= 0) & n_ok[None, :]  # every key < seq_len is visible to the query
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, True, FP8_PTX)
    acc = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if REDUCE == 1:  # _REDUCE_DIRECT: the only split's partial is the output
        tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        idx = (s.to(tl.int64) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + idx, m_i, mask=row_ok)
        tl.store(part_l_ptr + idx, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
                          stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          HEAD_SIZE: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid ``(num_decodes, H)``: out = sum_i w_i o_i / sum_i w_i, w_i = 2^(m_i - M) l_i."""
    pdl_start(USE_PDL)
    s = tl.program_id(0)
    h = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + s).to(tl.int64)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_SIZE)
    idx = (s.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + sp
    m = tl.load(part_m_ptr + idx)
    l = tl.load(part_l_ptr + idx)
    w = tl.exp2(m - tl.max(m, 0)) * l
    denom = tl.sum(w, 0)
    o = tl.load(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :])
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


# ---------------------------------------------------------------------------------------------
# Launchers
# ---------------------------------------------------------------------------------------------


def _p2(x: int) -> int:
    return triton.next_power_of_2(x)


def _dot_precision(dtype) -> str:
    # tf32x3: three tf32 products, float32-level accuracy on the tensor cores. Ignored for 16-bit.
    return "tf32x3" if dtype == torch.float32 else "tf32"


def _dot_fp32(q: torch.Tensor) -> bool:
    """Run the dots in float32 for bf16 on the CPU: there Triton runs in its interpreter, which
    has no bf16 arithmetic (it would multiply the raw bit patterns, triton issue #11584)."""
    return q.dtype == torch.bfloat16 and q.device.type == "cpu"


def _prefill_tiles(dtype, head_size: int) -> tuple[int, int]:
    """(BLOCK_M rows of q, BLOCK_N keys) per prefill program; sized to stay out of local memory."""
    if dtype == torch.float32:
        return (32, 32) if head_size <= 128 else (32, 16)
    return (128, 64) if head_size <= 128 else (64, 32)


def _decode_block_n(dtype, head_size: int) -> int:
    if dtype == torch.float32:
        return 32 if head_size <= 128 else 16
    return 64 if head_size <= 128 else 32


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError("k_cache and v_cache must have the same shape and strides, got "
                         f"{tuple(k_cache.shape)}/{k_cache.stride()} and "
                         f"{tuple(v_cache.shape)}/{v_cache.stride()}.")
    if k_cache.stride(-1) != 1:
        raise ValueError("the KV cache's head dimension must be contiguous (stride 1).")


_FP8_CACHE_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def _is_fp8(cache: torch.Tensor) -> bool:
    return cache.dtype in _FP8_CACHE_DTYPES


def _fp8_max(cache: torch.Tensor) -> float:
    return float(torch.finfo(cache.dtype).max) if _is_fp8(cache) else 0.0


@functools.lru_cache(maxsize=None)
def _has_e4m3_cvt(index: int) -> bool:
    """``cvt.rn.f16x2.e4m3x2``: NVIDIA sm89+ (a ROCm build also answers torch.cuda: no PTX)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index) >= (8, 9)


_FP8_CONVERT = {"triton": 0, "cvt": 1, "bits": 2}


def _fp8_ptx(q: torch.Tensor, k_cache: torch.Tensor, fp8_convert: str = "auto") -> int:
    """How an e4m3 cache's tiles are widened (module docstring): 0 ``.to(q.dtype)``; with inline
    PTX and fp16 dots, 1 ``cvt.rn.f16x2.e4m3x2``, 2 bit moves (``e4m3_to_16bit``).
    ``fp8_convert``: "auto", or one of ``_FP8_CONVERT`` (benchmarks)."""
    if fp8_convert != "auto" and fp8_convert not in _FP8_CONVERT:
        raise ValueError(f"fp8_convert is 'auto' or one of {', '.join(_FP8_CONVERT)}, got "
                         f"{fp8_convert!r}.")
    ptx_ok = (k_cache.dtype == torch.float8_e4m3fn and q.is_cuda
              and q.dtype in (torch.float16, torch.bfloat16) and _has_e4m3_cvt(q.device.index or 0))
    if not ptx_ok:
        return 0
    return _FP8_CONVERT[fp8_convert] if fp8_convert != "auto" else 1


def _k_factor(k_cache: torch.Tensor, k_scale: float) -> float:
    return k_scale if _is_fp8(k_cache) else 1.0


def _v_factor(v_cache: torch.Tensor, v_scale: float) -> float:
    return v_scale if _is_fp8(v_cache) else 1.0


def reshape_and_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                      v_cache: torch.Tensor, slot_mapping: torch.Tensor, k_scale: float = 1.0,
                      v_scale: float = 1.0) -> None:
    """Write ``k``/``v`` ``[T, KVH, D]`` into the caches at ``slot_mapping`` (-1: skip).
    An fp8 cache stores ``k / k_scale`` and ``v / v_scale``, saturated."""
    num_tokens, num_kv_heads, head_size = k.shape
    if num_tokens == 0:
        return
    assert k.stride(-1) == 1 and v.stride(-1) == 1, "k/v head dimension must be contiguous"
    _reshape_and_cache_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        1.0 / k_scale, 1.0 / v_scale,
        NUM_KV_HEADS=num_kv_heads, KVH_P2=_p2(num_kv_heads), HEAD_SIZE=head_size,
        BLOCK_SIZE=k_cache.shape[1], FP8=_is_fp8(k_cache), FP8_MAX=_fp8_max(k_cache),
        num_warps=4 if num_kv_heads * head_size >= 1024 else 1, **pdl_args(k.device))


def rotary_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, slot_mapping: torch.Tensor, positions: torch.Tensor,
                     cos_sin_cache: torch.Tensor, k_scale: float = 1.0,
                     v_scale: float = 1.0) -> None:
    """NeoX rotary and the cache write in one launch: rotates ``q`` ``[T, H, D]`` in place for
    every token, and writes NeoX-rotated ``k`` and ``v`` ``[T, KVH, D]`` into the caches at
    ``slot_mapping`` (-1: no write) like ``reshape_and_cache``. ``k`` is left as it was.
    ``positions``: ``[T]`` indices into ``cos_sin_cache`` ``[max_position, D]`` (cos in the
    first half, sin in the second). Same values as ``TritonOps.rotary_embedding`` followed by
    ``reshape_and_cache``."""
    num_tokens, num_heads, head_size = q.shape
    num_kv_heads = k.shape[1]
    if cos_sin_cache.shape[-1] != head_size:
        raise ValueError(f"cos_sin_cache width {cos_sin_cache.shape[-1]} != head_size "
                         f"{head_size}: the fused rotary rotates whole heads (NeoX) only.")
    if head_size < 16 or head_size & (head_size - 1):
        raise ValueError(f"the fused rotary needs a power-of-two head size >= 16, got "
                         f"{head_size}.")
    if num_tokens == 0:
        return
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, \
        "q/k/v head dimension must be contiguous"
    assert cos_sin_cache.stride(-1) == 1 and positions.numel() == num_tokens
    _rotary_and_cache_kernel[(num_tokens,)](
        positions.reshape(-1), cos_sin_cache, q, k, v, k_cache, v_cache, slot_mapping,
        cos_sin_cache.stride(0), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), 1.0 / k_scale, 1.0 / v_scale,
        NUM_HEADS=num_heads, HEADS_P2=_p2(num_heads), NUM_KV_HEADS=num_kv_heads,
        KVH_P2=_p2(num_kv_heads), HEAD_SIZE=head_size, BLOCK_SIZE=k_cache.shape[1],
        FP8=_is_fp8(k_cache), FP8_MAX=_fp8_max(k_cache), num_warps=4, **pdl_args(k.device))


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, *, seq_offset: int,
                      num_seqs: int, max_query_len: int,
                      sliding_window: Optional[int] = None,
                      tiles: Optional[tuple[int, int, int, int]] = None,
                      k_scale: float = 1.0, v_scale: float = 1.0,
                      fp8_convert: str = "auto") -> None:
    """Causal attention of sequences ``seq_offset .. seq_offset + num_seqs - 1`` of the flat
    batch over their paged context; writes their rows of ``out`` ``[T, H, D]``.
    ``k_scale``/``v_scale``: an fp8 cache's per-tensor scales (ignored for other caches);
    ``fp8_convert``: how its tiles are widened (``_fp8_ptx``; "auto" unless benchmarking).

    ``tiles``: (BLOCK_M, BLOCK_N, num_warps, num_stages) to override the defaults (benchmarks).
    """
    if num_seqs == 0 or max_query_len == 0:
        return
    _check_cache(k_cache, v_cache)
    num_heads, head_size = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    group_p2 = _p2(group)
    block_m, block_n = _prefill_tiles(q.dtype, head_size)
    num_warps, num_stages = 8 if block_m * head_size >= 8192 else 4, 2
    if tiles is not None:
        block_m, block_n, num_warps, num_stages = tiles
    block_m = max(block_m, group_p2)
    block_m = min(block_m, max(16, group_p2 * _p2(max_query_len)))  # short chunks: small tiles
    block_q = block_m // group_p2
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        seq_offset, scale * _LOG2E * _k_factor(k_cache, k_scale), _v_factor(v_cache, v_scale),
        sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_SIZE=head_size, BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q),
        FP8_PTX=_fp8_ptx(q, k_cache, fp8_convert), num_warps=num_warps, num_stages=num_stages)


def decode_workspace_numel(num_seqs: int, num_heads: int, num_splits: int, head_size: int) -> int:
    """float32 elements of workspace ``decode_attention`` needs: partial outs, maxes, sums."""
    return num_seqs * num_heads * num_splits * (head_size + 2)


# How a decode's splits are combined (``_decode_split_kernel``'s REDUCE).
_REDUCE_SEPARATE = 0  # partials to the workspace, then ``_decode_reduce_kernel``
_REDUCE_DIRECT = 1  # one split: it writes the output itself


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, *, num_seqs: int, num_splits: int,
                     workspace: torch.Tensor, sliding_window: Optional[int] = None,
                     min_partition: int = 128,
                     tiles: Optional[tuple[int, int, int]] = None,
                     k_scale: float = 1.0, v_scale: float = 1.0,
                     fp8_convert: str = "auto", fused_reduce: bool = True) -> None:
    """Split-KV attention of the first ``num_seqs`` sequences (one query token each).

    ``num_splits``: a power of two, a host int fixed per batch size. ``workspace``: float32, at
    least ``decode_workspace_numel(...)`` elements; reused, never read before written.
    ``tiles``: (BLOCK_N, num_warps, num_stages) to override the defaults (benchmarks).
    ``k_scale``/``v_scale``/``fp8_convert``: as for ``prefill_attention``.

    ``fused_reduce``: with one split, the split kernel writes the output itself (one launch);
    otherwise, or when False, ``_decode_reduce_kernel`` follows.
    """
    if num_seqs == 0:
        return
    _check_cache(k_cache, v_cache)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits: a power of two"
    num_heads, head_size = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    n_part = num_seqs * num_heads * num_splits
    assert workspace.dtype == torch.float32 and workspace.numel() >= n_part * (head_size + 2)
    part_out = workspace[:n_part * head_size]
    part_m = workspace[n_part * head_size:n_part * (head_size + 1)]
    part_l = workspace[n_part * (head_size + 1):n_part * (head_size + 2)]
    reduce = _REDUCE_DIRECT if fused_reduce and num_splits == 1 else _REDUCE_SEPARATE
    fp8_ptx = _fp8_ptx(q, k_cache, fp8_convert)
    # fp8 tiles: 2 warps (H200, batch 256, Llama-8B heads: 207 us vs 221 with 4 warps; the
    # bf16 cache keeps 4, its best: benchmarks/quantization/fp8_kernels.py --attention-sweep)
    block_n, num_warps, num_stages = _decode_block_n(q.dtype, head_size), 2 if fp8_ptx else 4, 3
    if tiles is not None:
        block_n, num_warps, num_stages = tiles
    _decode_split_kernel[(num_seqs, num_kv_heads, num_splits)](
        q, k_cache, v_cache, out, part_out, part_m, part_l, query_start_loc, seq_lens, block_tables,
        scale * _LOG2E * _k_factor(k_cache, k_scale), _v_factor(v_cache, v_scale),
        sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, _p2(group)), NUM_SPLITS=num_splits,
        MIN_PART=max(min_partition, block_n), BLOCK_N=block_n, HEAD_SIZE=head_size,
        BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q), FP8_PTX=fp8_ptx,
        REDUCE=reduce, num_warps=num_warps, num_stages=num_stages, **pdl_args(q.device))
    if reduce == _REDUCE_SEPARATE:
        _decode_reduce_kernel[(num_seqs, num_heads)](
            out, part_out, part_m, part_l, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_SIZE=head_size, num_warps=4,
            **pdl_args(q.device))


# ---------------------------------------------------------------------------------------------
# The AttentionKernel
# ---------------------------------------------------------------------------------------------


@dataclass
class TritonAttentionMetadata:
    """What ``TritonAttentionKernel.forward`` needs for one step. Tensors are on the device."""

    num_decodes: int  # the first num_decodes sequences: one query each, split-KV kernel
    num_prefills: int  # the rest: varlen prefill kernel
    num_splits: int  # decode splits per (sequence, KV head); a function of num_decodes only
    max_query_len: int  # bounds the prefill grid
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1 = skip


class TritonAttentionKernel:
    """Paged attention through this module's Triton kernels (``AttentionKernel`` protocol).

    The split-KV workspace is allocated on the first decode forward, sized for
    ``max_num_seqs`` decodes, and reused by every layer; a larger batch grows it (outside graph
    capture: run each captured size eagerly once first, as graph runners do for warm-up).
    """

    name = "triton"
    supports_sliding_window = True
    supports_graph_capture = True  # no host sync in forward; grid fixed per batch size
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3")  # fp8: e4m3 cache, needs sm89+ (Ada, Hopper)
    # forward takes positions/cos_sin_cache and applies NeoX rotary as it writes the cache
    # (``rotary_and_cache``): one launch per layer instead of two.
    fuses_rotary = True
    min_partition = 128  # fewest keys a decode split handles (bounds partial-output traffic)
    target_programs = 1024  # decode programs wanted to fill the GPU (about 8 per SM on H100)
    max_splits = 32
    # One decode split writes the output itself (no reduce launch, ``decode_attention``);
    # False: always the separate reduce kernel (set on an instance for tests and benchmarks).
    fused_reduce = True

    def __init_subclass__(cls, **kwargs):
        # A subclass serves an fp8 cache only if it says so: its forward must pass k_scale and
        # v_scale on (and its hardware may want another fp8 format, e.g. e4m3fnuz on MI300).
        # Likewise a subclass with its own forward fuses rotary only if it says so.
        super().__init_subclass__(**kwargs)
        if "kv_cache_dtypes" not in cls.__dict__:
            cls.kv_cache_dtypes = ("auto",)
        if "forward" in cls.__dict__ and "fuses_rotary" not in cls.__dict__:
            cls.fuses_rotary = False

    def __init__(self, spec, max_model_len: int, max_num_seqs: int = 256):
        head_size = spec.head_size
        if head_size < 16 or head_size & (head_size - 1):
            raise ValueError(f"Triton attention needs a power-of-two head size >= 16, got "
                             f"{head_size}; use the reference kernel for this model.")
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}.")
        if spec.kv_cache_dtype not in self.kv_cache_dtypes:
            raise ValueError(f"Triton attention supports kv_cache_dtype "
                             f"{', '.join(self.kv_cache_dtypes)}; got {spec.kv_cache_dtype!r}.")
        # The dtype the engine allocates the cache in (None: the model's dtype).
        self.kv_cache_torch_dtype = (torch.float8_e4m3fn if spec.kv_cache_dtype != "auto"
                                     else None)
        # Per-tensor fp8 scales (cache holds k / k_scale, v / v_scale): 1.0 unless a checkpoint
        # or calibration sets them. One pair for every layer (the kernel is shared).
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.fp8_convert = "auto"  # how fp8 tiles are widened (``_fp8_ptx``); tests, benchmarks
        self.spec = spec
        self.max_model_len = max_model_len
        self.max_num_seqs = max_num_seqs
        self.sliding_window = spec.sliding_window
        self._splits_cap = max(1, min(self.max_splits, _p2(math.ceil(max_model_len
                                                                     / self.min_partition))))
        self._workspace: Optional[torch.Tensor] = None

    def num_splits(self, num_decodes: int) -> int:
        """Decode splits for a batch of ``num_decodes``: enough programs to fill the GPU."""
        programs = max(1, num_decodes * self.spec.num_kv_heads)
        want = _p2(math.ceil(self.target_programs / programs))
        return max(1, min(want, self._splits_cap))

    def workspace_numel(self, num_decodes: int) -> int:
        return decode_workspace_numel(num_decodes, self.spec.num_heads,
                                      self.num_splits(num_decodes), self.spec.head_size)

    def build_metadata(self, batch) -> TritonAttentionMetadata:
        return TritonAttentionMetadata(
            num_decodes=batch.num_decodes, num_prefills=batch.num_seqs - batch.num_decodes,
            num_splits=self.num_splits(batch.num_decodes), max_query_len=batch.max_query_len,
            query_start_loc=batch.query_start_loc, seq_lens=batch.seq_lens,
            block_tables=batch.block_tables, slot_mapping=batch.slot_mapping)

    def _get_workspace(self, num_decodes: int, device) -> torch.Tensor:
        need = self.workspace_numel(num_decodes)
        ws = self._workspace
        if ws is None or ws.numel() < need or ws.device != device:
            cap = max(self.workspace_numel(n) for n in range(1, self.max_num_seqs + 1))
            self._workspace = ws = torch.empty(max(need, cap), dtype=torch.float32,
                                               device=device)
        return ws

    def _decode_buffers(self, num_decodes: int, device) -> dict:
        """``decode_attention``'s workspace and reduce mode."""
        return dict(workspace=self._get_workspace(num_decodes, device),
                    fused_reduce=self.fused_reduce)

    def forward(self, q, k, v, k_cache, v_cache, metadata: TritonAttentionMetadata, scale: float,
                out: Optional[torch.Tensor] = None, *, positions: Optional[torch.Tensor] = None,
                cos_sin_cache: Optional[torch.Tensor] = None):
        """``AttentionKernel.forward``; with ``positions`` and ``cos_sin_cache`` (``fuses_rotary``)
        q and k arrive unrotated: q is NeoX-rotated in place, k as it is written to the cache."""
        md = metadata
        if positions is None:
            reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping, self.k_scale,
                              self.v_scale)
        else:
            rotary_and_cache(q, k, v, k_cache, v_cache, md.slot_mapping, positions,
                             cos_sin_cache, self.k_scale, self.v_scale)
        if out is None:
            out = torch.empty_like(q)
        if md.num_decodes:
            decode_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                             md.block_tables, scale, num_seqs=md.num_decodes,
                             num_splits=md.num_splits,
                             sliding_window=self.sliding_window, min_partition=self.min_partition,
                             k_scale=self.k_scale, v_scale=self.v_scale,
                             fp8_convert=self.fp8_convert,
                             **self._decode_buffers(md.num_decodes, q.device))
        if md.num_prefills:
            prefill_attention(q, k_cache, v_cache, out, md.query_start_loc, md.seq_lens,
                              md.block_tables, scale, seq_offset=md.num_decodes,
                              num_seqs=md.num_prefills, max_query_len=md.max_query_len,
                              sliding_window=self.sliding_window, k_scale=self.k_scale,
                              v_scale=self.v_scale, fp8_convert=self.fp8_convert)
        return out
