"""Split-KV paged decode attention: grid ``(num_decodes, KVH, num_splits)``; with one split
the split kernel writes the output itself, with more ``_decode_reduce_kernel`` combines the
partials, or (``counters`` given: small decode batches, ``TESSELLM_ATTN_LAST_REDUCE``) the last
split of each (sequence, KV head) to finish does, counting the finished splits in an int32
counter. See ``tessellm.kernels.attention`` for the split arithmetic.

``query_len`` > 1 (speculative decoding's verify steps: every sequence has the same few query
tokens, the last ``query_len`` of its ``seq_len``): each program packs the ``query_len x GROUP``
rows of its KV head into one tile (``row = query * GROUP_P2 + g``) and masks keys past each
query's position, so a verify pass of 4 tokens reads every K/V tile once, split over the GPU
like a decode, instead of the prefill kernel's one program per (sequence, KV head) walking the
whole context (8 programs at batch 1 on Llama-8B heads). Workspace and reduction are per
(sequence, query, head)::

    keys:    0 ............................ L-q  L-q+1 ... L-1
    query 0: sees keys <= L-q                (position L-q)
    query j: sees keys <= L-q+j
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import (
    _LOG2E,
    _NEG_BIG,
    _attend_kv,
    _attend_tile,
    _check_cache,
    _dot_fp32,
    _dot_precision,
    _FP8_CONVERT,
    _fp8_ptx,
    _is_fp8,
    _join_sinks,
    _k_factor,
    _kv_offsets,
    _load_q,
    _p2,
    _softcap,
    _softcap_log2,
    _v_factor,
)
from tessellm.kernels.attention.decode_table import cache_kind, lookup
from tessellm.kernels.pdl import pdl_args, pdl_launch, pdl_wait
from tessellm.kernels.rotary import rope_full


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr,
                         part_l_ptr, query_start_loc_ptr, seq_lens_ptr,
                         block_tables_ptr, pos_ptr, cos_sin_ptr, k_ptr, v_ptr, slot_ptr,
                         sinks_ptr, counter_ptr, scale_log2, v_scale, window, softcap,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_cb, stride_ct, stride_ch, stride_bt,
                         stride_cs, stride_kt, stride_kh, stride_vt, stride_vh,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         QUERY_LEN: tl.constexpr, GROUP_P2: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_PART: tl.constexpr,
                         BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
                         DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr,
                         REDUCE: tl.constexpr, PREFETCH: tl.constexpr, ROTARY: tl.constexpr,
                         HEAD_MAJOR: tl.constexpr, USE_PDL: tl.constexpr,
                         SOFTCAP: tl.constexpr, SINKS: tl.constexpr):
    """Grid ``(num_decodes, KVH, NUM_SPLITS)``, or ``(KVH, num_decodes, NUM_SPLITS)`` with
    HEAD_MAJOR (a sequence's KV heads in consecutive programs: they read the same tokens' rows
    of the cache at about the same time). Each split's normalized partial output, running
    max (log2 units) and sum of exponentials go where ``REDUCE`` says (``_REDUCE_*``): to the
    workspace for ``_decode_reduce_kernel`` (SEPARATE), or straight to ``out`` (DIRECT, one
    split), or to the workspace and then, by the last of a (sequence, KV head)'s splits to
    finish, combined into ``out`` (LAST, decodes without sinks: ``_combine_last``). QUERY_LEN query tokens per sequence (module docstring), rows ``tq * GROUP_P2 + g``.
    PREFETCH: the first K/V tile's cached keys are loaded before the PDL wait. ROTARY (decodes
    only): q, k, v arrive unrotated; see ``_new_key``. SOFTCAP: scores soft-capped at
    ``softcap`` (log2 units, ``common._softcap``). SINKS: the heads' ``sinks_ptr`` logits join
    the softmax once per row: here when this split is the only one (DIRECT), else in
    ``_decode_reduce_kernel`` (a split's partial never holds the sink)."""
    pdl_launch(USE_PDL)
    # Before the wait: only the step's inputs and keys of earlier steps (``pdl.py``).
    if HEAD_MAJOR:
        kvh = tl.program_id(0)
        s = tl.program_id(1)
    else:
        s = tl.program_id(0)
        kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    part = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    part = tl.maximum(part, MIN_PART)
    start = split * part
    end = tl.minimum(start + part, seq_len)
    if USE_WINDOW:  # the first query's window starts earliest
        start = tl.maximum(start, seq_len - QUERY_LEN + 1 - window)
    n_new = seq_len - QUERY_LEN  # keys n >= n_new: written by this step (the predecessor)
    end_cache = end
    if ROTARY:  # the new key comes from registers (``_new_key``), not from the cache
        end_cache = tl.minimum(end, n_new)

    rows = tl.arange(0, BLOCK_M)
    tq = rows // GROUP_P2  # query index inside the sequence (0 for a decode)
    g = rows % GROUP_P2
    row_ok = (tq < QUERY_LEN) & (g < GROUP)
    head = kvh * GROUP + g
    if QUERY_LEN == 1:  # a decode: one token row
        tok = tl.load(query_start_loc_ptr + s).to(tl.int64)
    else:
        tok = tl.load(query_start_loc_ptr + s).to(tl.int64) + tq
    q_pos = seq_len - QUERY_LEN + tq
    d = tl.arange(0, HEAD_SIZE)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    first = start
    if PREFETCH:
        n0 = start + tl.arange(0, BLOCK_N)
        n0_ok = n0 < end_cache
        old = n0_ok & (n0 < n_new)
        off0 = _kv_offsets(bt_ptr, n0, n0_ok, kvh, stride_cb, stride_ct, stride_ch, BLOCK_SIZE)
        k0 = tl.load(k_cache_ptr + off0[:, None] + d[None, :], mask=old[:, None], other=0.0)
        v0 = tl.load(v_cache_ptr + off0[:, None] + d[None, :], mask=old[:, None], other=0.0)
        first = start + BLOCK_N
    if ROTARY:
        HALF: tl.constexpr = HEAD_SIZE // 2
        pos = tl.load(pos_ptr + tok).to(tl.int64)
        cos = tl.load(cos_sin_ptr + pos * stride_cs + d % HALF)
        sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + d % HALF)
        slot = tl.load(slot_ptr + tok)
    pdl_wait(USE_PDL)

    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    if ROTARY:
        q, qk_scale, acc, m_i, l_i = _new_key(
            q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, tok, head, kvh, d, row_ok, cos, sin,
            slot, (n_new >= start) & (n_new < end), acc, m_i, l_i, scale_log2, softcap,
            stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
            stride_cb, stride_ct, stride_ch, HEAD_SIZE, BLOCK_SIZE, DOT_FP32, SOFTCAP)
    else:
        q, qk_scale = _load_q(q_ptr, tok, head, d, row_ok, stride_qt, stride_qh, scale_log2,
                              DOT_FP32, FP8_PTX)
    if PREFETCH:
        if not ROTARY:  # this step's keys, written by the predecessor: read after the wait
            new = n0_ok & (n0 >= n_new)
            k0 = tl.where(new[:, None], tl.load(k_cache_ptr + off0[:, None] + d[None, :],
                                                mask=new[:, None], other=0.0), k0)
            v0 = tl.where(new[:, None], tl.load(v_cache_ptr + off0[:, None] + d[None, :],
                                                mask=new[:, None], other=0.0), v0)
        mask = _key_mask(rows, n0, n0_ok, q_pos, window, QUERY_LEN, USE_WINDOW)
        acc, m_i, l_i = _attend_kv(q, acc, m_i, l_i, k0, v0, mask, qk_scale, softcap, DOT_PREC,
                                   True, FP8_PTX, SOFTCAP)
    for n_start in range(first, end_cache, BLOCK_N):
        n = n_start + tl.arange(0, BLOCK_N)
        n_ok = n < end_cache
        mask = _key_mask(rows, n, n_ok, q_pos, window, QUERY_LEN, USE_WINDOW)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, softcap, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, True, FP8_PTX, SOFTCAP)
    if SINKS and REDUCE == 1:
        acc, m_i, l_i = _join_sinks(acc, m_i, l_i, sinks_ptr, head, row_ok)
    acc = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if REDUCE == 1:  # _REDUCE_DIRECT: the only split's partial is the output
        tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        idx = ((s.to(tl.int64) * QUERY_LEN + tq) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + idx, m_i, mask=row_ok)
        tl.store(part_l_ptr + idx, l_i, mask=row_ok)
        if REDUCE == 2:  # _REDUCE_LAST
            # Every thread's partial stores come before the counter's release (the barrier),
            # and the program that takes the count to NUM_SPLITS reads them all after its
            # acquire (CUTLASS's semaphore pattern: bar.sync, then one thread's acq_rel RMW).
            tl.debug_barrier()
            counter = counter_ptr + s * (NUM_HEADS // GROUP) + kvh
            done = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
            if done == NUM_SPLITS - 1:
                tl.atomic_xchg(counter, 0, sem="relaxed", scope="gpu")  # for the next launch
                _combine_last(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, tok, s, kvh,
                              stride_ot, stride_oh, NUM_HEADS, GROUP, GROUP_P2, NUM_SPLITS,
                              HEAD_SIZE)


@triton.jit
def _combine_last(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, tok, s, kvh, stride_ot,
                  stride_oh, NUM_HEADS: tl.constexpr, GROUP: tl.constexpr,
                  GROUP_P2: tl.constexpr, NUM_SPLITS: tl.constexpr, HEAD_SIZE: tl.constexpr):
    """``_decode_reduce_kernel``'s arithmetic for the GROUP heads of one (decode, KV head), by
    the split program that finished last: the partials of all its heads and splits in one
    ``[GROUP_P2, NUM_SPLITS, HEAD_SIZE]`` tile (one round of L2 reads, not one per head). The
    loads bypass L1 (``.cg``): the other programs' stores went to L2."""
    g = tl.arange(0, GROUP_P2)
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_SIZE)
    head = kvh * GROUP + g
    ok = g < GROUP
    idx = (s.to(tl.int64) * NUM_HEADS + head)[:, None] * NUM_SPLITS + sp[None, :]
    m = tl.load(part_m_ptr + idx, mask=ok[:, None], other=_NEG_BIG, cache_modifier=".cg")
    l = tl.load(part_l_ptr + idx, mask=ok[:, None], other=0.0, cache_modifier=".cg")
    o = tl.load(part_out_ptr + idx[:, :, None] * HEAD_SIZE + d[None, None, :],
                mask=ok[:, None, None], other=0.0, cache_modifier=".cg")
    m_max = tl.max(m, 1)
    w = tl.exp2(m - m_max[:, None]) * l
    denom = tl.sum(w, 1)
    out = tl.sum(w[:, :, None] * o, 1) / tl.where(denom > 0, denom, 1.0)[:, None]
    tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=ok[:, None])


@triton.jit
def _key_mask(rows, n, n_ok, q_pos, window, QUERY_LEN: tl.constexpr, USE_WINDOW: tl.constexpr):
    mask = (rows[:, None] >= 0) & n_ok[None, :]  # a decode's query sees every key < seq_len
    if QUERY_LEN > 1:  # causal among the step's queries
        mask = mask & (n[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            mask = mask & (n[None, :] > q_pos[:, None] - window)
    return mask


@triton.jit
def _new_key(q_ptr, k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, tok, head, kvh, d, row_ok, cos, sin,
             slot, own, acc, m_i, l_i, scale_log2, softcap, stride_qt, stride_qh, stride_kt,
             stride_kh, stride_vt, stride_vh, stride_cb, stride_ct, stride_ch,
             HEAD_SIZE: tl.constexpr, BLOCK_SIZE: tl.constexpr, DOT_FP32: tl.constexpr,
             SOFTCAP: tl.constexpr):
    """A decode's rotary and cache write, fused (ROTARY): every program NeoX-rotates its q rows
    (``rope_full``, ``rotary_and_cache``'s arithmetic); the program owning the new key
    (``own``: its split holds position seq_len - 1) rotates that key, writes it and v to the
    caches at ``slot`` (-1: not written) and takes it into the softmax from registers."""
    HALF: tl.constexpr = HEAD_SIZE // 2
    dp = (d + HALF) % HEAD_SIZE  # each element's rotary partner
    sign = tl.where(d < HALF, -1.0, 1.0)
    q_row = q_ptr + (tok * stride_qt + head * stride_qh)[:, None]
    q = rope_full(tl.load(q_row + d[None, :], mask=row_ok[:, None], other=0.0),
                  tl.load(q_row + dp[None, :], mask=row_ok[:, None], other=0.0),
                  cos[None, :], sin[None, :], sign[None, :], q_ptr.dtype.element_ty)
    k_row = k_ptr + tok * stride_kt + kvh * stride_kh
    key_ok = d < tl.where(own, HEAD_SIZE, 0)  # (scalar & vector masks fail in the interpreter)
    k = rope_full(tl.load(k_row + d, mask=key_ok, other=0.0),
                  tl.load(k_row + dp, mask=key_ok, other=0.0), cos, sin, sign,
                  k_ptr.dtype.element_ty)
    v = tl.load(v_ptr + tok * stride_vt + kvh * stride_vh + d, mask=key_ok, other=0.0)
    slot = slot.to(tl.int64)
    c_off = (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct + kvh * stride_ch
    write_ok = d < tl.where(own & (slot >= 0), HEAD_SIZE, 0)
    tl.store(k_cache_ptr + c_off + d, k.to(k_cache_ptr.dtype.element_ty), mask=write_ok)
    tl.store(v_cache_ptr + c_off + d, v.to(v_cache_ptr.dtype.element_ty), mask=write_ok)
    # the tile path's rounding: a dot of q and k (fp32 sums), P in q's dtype times v
    s_new = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * scale_log2
    if SOFTCAP:
        s_new = _softcap(s_new, softcap)
    s_new = tl.where(row_ok & own, s_new, float("-inf"))
    m_new = tl.maximum(m_i, s_new)
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s_new - m_new)
    acc = acc * alpha[:, None] + p.to(q.dtype).to(tl.float32)[:, None] * v.to(tl.float32)[None, :]
    if DOT_FP32:  # tiles take q's dtype (``_load_q``)
        q = q.to(tl.float32)
    return q, scale_log2, acc, m_new, l_i * alpha + p


@triton.jit
def _decode_reduce_kernel(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
                          sinks_ptr, stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          HEAD_SIZE: tl.constexpr, QUERY_LEN: tl.constexpr,
                          USE_PDL: tl.constexpr, SINKS: tl.constexpr):
    """Grid ``(num_decodes * QUERY_LEN, H)``: out = sum_i w_i o_i / sum_i w_i,
    w_i = 2^(m_i - M) l_i. SINKS: head h's sink s (log2 units) joins once, as a split with no
    value: M = max(M, s), the denominator gains 2^(s - M)."""
    pdl_launch(USE_PDL)
    sq = tl.program_id(0)  # sequence * QUERY_LEN + query
    h = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + sq // QUERY_LEN).to(tl.int64) + sq % QUERY_LEN
    pdl_wait(USE_PDL)  # the partials: written by the split kernel
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_SIZE)
    idx = (sq.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + sp
    m = tl.load(part_m_ptr + idx)
    l = tl.load(part_l_ptr + idx)
    m_max = tl.max(m, 0)
    if SINKS:
        sink = tl.load(sinks_ptr + h).to(tl.float32) * 1.4426950408889634
        m_max = tl.maximum(m_max, sink)
    w = tl.exp2(m - m_max) * l
    denom = tl.sum(w, 0)
    if SINKS:
        denom += tl.exp2(sink - m_max)
    o = tl.load(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :])
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _launch_shape(dtype, cache_dtype, head_size: int, fp8_ptx: int, fp8_convert: str,
                  num_seqs: int, tiles: Optional[tuple[int, int, int]],
                  head_major: Optional[bool]):
    """(BLOCK_N, num_warps, num_stages, head_major, FP8_PTX): ``tiles``/``head_major``/
    ``fp8_convert`` where given, else ``decode_table``'s entry for ``num_seqs`` plain decodes
    (0: none), else the defaults."""
    entry = lookup(cache_kind(cache_dtype, fp8_ptx), num_seqs) if num_seqs else None
    shape = entry[:3] if entry is not None else _default_tiles(dtype, head_size, fp8_ptx)
    if head_major is None:
        head_major = bool(entry[3]) if entry is not None else False
    if entry is not None and len(entry) > 5 and fp8_ptx == 1 and fp8_convert == "auto":
        fp8_ptx = _FP8_CONVERT[entry[5]]  # the table's e4m3 widening ("kdot")
    return (*(tiles if tiles is not None else shape), head_major, fp8_ptx)


def _default_tiles(dtype, head_size: int, fp8_ptx: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) where ``decode_table`` has no entry. fp8 tiles: 2
    warps (H200, batch 256, Llama-8B heads: 207 us vs 221 with 4 warps; the bf16 cache keeps
    4, its best: benchmarks/quantization/fp8_kernels.py --attention-sweep)."""
    return _decode_block_n(dtype, head_size), 2 if fp8_ptx else 4, 3


def _decode_block_n(dtype, head_size: int) -> int:
    if dtype == torch.float32:
        return 32 if head_size <= 128 else 16
    return 64 if head_size <= 128 else 32


def decode_counters_numel(num_seqs: int, num_kv_heads: int) -> int:
    """int32 counters ``decode_attention``'s last-split reduce needs (zeroed once)."""
    return num_seqs * num_kv_heads


def decode_workspace_numel(num_seqs: int, num_heads: int, num_splits: int, head_size: int,
                           query_len: int = 1) -> int:
    """float32 elements of workspace ``decode_attention`` needs: partial outs, maxes, sums."""
    return num_seqs * query_len * num_heads * num_splits * (head_size + 2)


# How a decode's splits are combined (``_decode_split_kernel``'s REDUCE).
_REDUCE_SEPARATE = 0  # partials to the workspace, then ``_decode_reduce_kernel``


_REDUCE_DIRECT = 1  # one split: it writes the output itself
_REDUCE_LAST = 2  # partials to the workspace; the last split to finish combines them


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                     block_tables: torch.Tensor, scale: float, *, num_seqs: int, num_splits: int,
                     workspace: torch.Tensor, sliding_window: Optional[int] = None,
                     min_partition: int = 128,
                     tiles: Optional[tuple[int, int, int]] = None,
                     k_scale: float = 1.0, v_scale: float = 1.0,
                     fp8_convert: str = "auto", fused_reduce: bool = True,
                     query_len: int = 1, prefetch: bool = False,
                     rotary: Optional[tuple] = None, head_major: Optional[bool] = None,
                     logit_softcap: Optional[float] = None,
                     sinks: Optional[torch.Tensor] = None,
                     counters: Optional[torch.Tensor] = None) -> None:
    """Split-KV attention of the first ``num_seqs`` sequences, ``query_len`` query tokens each
    (1: decodes; more: verify steps, the last ``query_len`` positions of each sequence, rows
    ``query_start_loc[s] ..`` consecutive).

    ``num_splits``: a power of two, a host int fixed per batch size. ``workspace``: float32, at
    least ``decode_workspace_numel(...)`` elements; reused, never read before written.
    ``tiles``: (BLOCK_N, num_warps, num_stages) to override the defaults (benchmarks), which
    are ``decode_table``'s entry for a plain decode batch of this size, else
    ``_default_tiles``. ``head_major``: the grid's first axis is the KV head (None: as the
    table says, else False).
    ``k_scale``/``v_scale``/``fp8_convert``: as for ``prefill_attention``.

    ``fused_reduce``: with one split, the split kernel writes the output itself (one launch);
    otherwise, or when False, ``_decode_reduce_kernel`` follows.

    ``prefetch``: each program loads its first K/V tile's keys of earlier steps before the PDL
    wait (``pdl.py``), so their latency hides under the kernel before (small batches).
    ``rotary``: ``(k, v, slot_mapping, positions, cos_sin_cache)`` of a pure-decode step
    (``query_len`` 1, a 16-bit cache) whose q and k arrive unrotated: the kernel does
    ``rotary_and_cache``'s work itself (``_new_key``) and q stays unrotated in memory.
    ``logit_softcap``: scores become ``cap * tanh(scale * q.k / cap)`` (None: no cap).
    ``sinks``: float ``[H]`` attention sinks, joined once per row (by the only split, or by
    the reduce kernel); None: none.
    ``counters``: int32 zeros, at least ``num_seqs * KVH`` (``decode_counters_numel``), kept
    between calls (every launch leaves them zero): with more than one split, decodes
    (``query_len`` 1) and no sinks, the last split of each (sequence, KV head) to finish
    combines the partials itself (no ``_decode_reduce_kernel`` launch); None: the reduce
    kernel. Same arithmetic as the reduce kernel up to the order of its float32 sums.
    """
    if num_seqs == 0:
        return
    _check_cache(k_cache, v_cache)
    assert num_splits >= 1 and num_splits & (num_splits - 1) == 0, "num_splits: a power of two"
    num_heads, head_size = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    n_part = num_seqs * query_len * num_heads * num_splits
    assert workspace.dtype == torch.float32 and workspace.numel() >= n_part * (head_size + 2)
    part_out = workspace[:n_part * head_size]
    part_m = workspace[n_part * head_size:n_part * (head_size + 1)]
    part_l = workspace[n_part * (head_size + 1):n_part * (head_size + 2)]
    reduce = _REDUCE_DIRECT if fused_reduce and num_splits == 1 else _REDUCE_SEPARATE
    if (reduce == _REDUCE_SEPARATE and counters is not None and query_len == 1
            and sinks is None):
        assert counters.dtype == torch.int32 and counters.numel() >= num_seqs * num_kv_heads
        reduce = _REDUCE_LAST
    fp8_ptx = _fp8_ptx(q, k_cache, fp8_convert)
    plain = q.is_cuda and query_len == 1 and not prefetch and rotary is None
    block_n, num_warps, num_stages, head_major, fp8_ptx = _launch_shape(
        q.dtype, k_cache.dtype, head_size, fp8_ptx, fp8_convert, num_seqs if plain else 0, tiles,
        head_major)
    if rotary is not None:
        assert query_len == 1 and not _is_fp8(k_cache), "fused rotary: 16-bit cache decodes"
        k, v, slots, positions, cos_sin = rotary
        assert cos_sin.shape[-1] == head_size and cos_sin.stride(-1) == 1
        assert k.stride(-1) == 1 and v.stride(-1) == 1 and q.stride(-1) == 1
        extra = (positions.reshape(-1), cos_sin, k, v, slots)
        extra_strides = (cos_sin.stride(0), k.stride(0), k.stride(1), v.stride(0), v.stride(1))
    else:
        extra, extra_strides = (seq_lens, q, q, q, seq_lens), (0, 0, 0, 0, 0)
    grid = (num_kv_heads, num_seqs, num_splits) if head_major else (num_seqs, num_kv_heads,
                                                                   num_splits)
    _decode_split_kernel[grid](
        q, k_cache, v_cache, out, part_out, part_m, part_l, query_start_loc, seq_lens, block_tables,
        *extra, q if sinks is None else sinks, seq_lens if counters is None else counters,
        scale * _LOG2E * _k_factor(k_cache, k_scale), _v_factor(v_cache, v_scale),
        sliding_window or 0, _softcap_log2(logit_softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        *extra_strides,
        NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, _p2(group) * _p2(query_len)),
        QUERY_LEN=query_len, GROUP_P2=_p2(group), NUM_SPLITS=num_splits,
        MIN_PART=max(min_partition, block_n), BLOCK_N=block_n, HEAD_SIZE=head_size,
        BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q), FP8_PTX=fp8_ptx,
        REDUCE=reduce, PREFETCH=prefetch, ROTARY=rotary is not None, HEAD_MAJOR=head_major,
        SOFTCAP=logit_softcap is not None, SINKS=sinks is not None, num_warps=num_warps,
        num_stages=num_stages, **pdl_args(q.device))
    if reduce == _REDUCE_SEPARATE:
        _decode_reduce_kernel[(num_seqs * query_len, num_heads)](
            out, part_out, part_m, part_l, query_start_loc, q if sinks is None else sinks,
            out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_SIZE=head_size,
            QUERY_LEN=query_len, SINKS=sinks is not None, num_warps=4,
            **pdl_args(q.device))
