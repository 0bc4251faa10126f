"""Varlen paged prefill attention: one program per (query block, sequence, KV head), every
KV tile read from the paged cache (``_attend_tile``).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import (
    _LOG2E, _NEG_BIG, _attend_tile, _check_cache, _dot_fp32, _dot_precision,
    _fp8_ptx, _join_sinks, _k_factor, _load_q, _p2, _softcap_log2, _v_factor)


@triton.jit
def _attend_keys(q, acc, m_i, l_i, lo, hi, k_cache_ptr, v_cache_ptr, bt_ptr, kvh, qk_scale, q_pos,
                 q_lim, window, softcap, stride_cb, stride_ct, stride_ch, HEAD_SIZE: tl.constexpr,
                 BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                 USE_WINDOW: tl.constexpr, CAUSAL: tl.constexpr, APPLY_MASK: tl.constexpr,
                 FP8_PTX: tl.constexpr, SOFTCAP: tl.constexpr):
    """Keys ``lo .. hi - 1`` in BLOCK_N tiles; CAUSAL masks keys past each row's limit ``q_lim``
    (its position, or its key limit: the diagonal tiles), USE_WINDOW keys before its sliding
    window (relative to ``q_pos``); APPLY_MASK when either is set."""
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        mask = n_ok[None, :]
        if CAUSAL:
            mask = mask & (n[None, :] <= q_lim[:, None])
        if USE_WINDOW:
            mask = mask & (n[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, softcap, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, APPLY_MASK, FP8_PTX, SOFTCAP)
    return acc, m_i, l_i


@triton.jit(do_not_specialize=["seq_offset"])  # (one variant for any number of decodes before)
def _prefill_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, sinks_ptr, key_limits_ptr,
                    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
                    seq_offset, scale_log2, v_scale, window, softcap,
                    stride_qt, stride_qh, stride_ot, stride_oh,
                    stride_cb, stride_ct, stride_ch, stride_bt,
                    GROUP: tl.constexpr, GROUP_P2: tl.constexpr, BLOCK_Q: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
                    DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr, SOFTCAP: tl.constexpr,
                    SINKS: tl.constexpr, KEY_LIMITS: tl.constexpr):
    """Grid ``(num_prefills, cdiv(max_query_len, BLOCK_Q), KVH)``; BLOCK_M = BLOCK_Q * GROUP_P2.
    SOFTCAP: scores soft-capped at ``softcap`` (log2 units, ``common._softcap``). SINKS: each
    head's ``sinks_ptr`` logit joins its rows' softmax after the keys (``common._join_sinks``).
    KEY_LIMITS: row i sees keys up to ``key_limits_ptr[token]`` (>= its position) instead of
    its position, and the tile's keys run to its rows' largest limit::

        rows of the tile:   q_pos 8 9 10 11        key limits 8 12 12 12   (an image 9..12)
        keys:  lo ........ mid ......... hi = 13   (causal alone: hi = 12)"""
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
    q, qk_scale = _load_q(q_ptr, tok, head, d, row_ok, stride_qt, stride_qh, scale_log2,
                          DOT_FP32, FP8_PTX)
    q_pos = ctx_len + tq

    hi = tl.minimum(seq_len, ctx_len + (qb + 1) * BLOCK_Q)
    q_lim = q_pos
    if KEY_LIMITS:
        lim = tl.load(key_limits_ptr + tok, mask=row_ok, other=0)
        q_lim = tl.maximum(lim, q_pos)
        hi = tl.minimum(seq_len, tl.maximum(hi, tl.max(tl.where(row_ok, q_lim, 0), 0) + 1))
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
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, lo, mid, k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
                                 qk_scale, q_pos, q_lim, window, softcap, stride_cb, stride_ct,
                                 stride_ch, HEAD_SIZE, BLOCK_SIZE, BLOCK_N, DOT_PREC, USE_WINDOW,
                                 False, USE_WINDOW, FP8_PTX, SOFTCAP)
    acc, m_i, l_i = _attend_keys(q, acc, m_i, l_i, mid, hi, k_cache_ptr, v_cache_ptr, bt_ptr, kvh,
                                 qk_scale, q_pos, q_lim, window, softcap, stride_cb, stride_ct,
                                 stride_ch, HEAD_SIZE, BLOCK_SIZE, BLOCK_N, DOT_PREC, USE_WINDOW,
                                 True, True, FP8_PTX, SOFTCAP)
    if SINKS:
        acc, m_i, l_i = _join_sinks(acc, m_i, l_i, sinks_ptr, head, row_ok)
    acc = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
             acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])


def _prefill_tiles(dtype, head_size: int) -> tuple[int, int, int, int]:
    """(BLOCK_M rows of q, BLOCK_N keys, warps, stages) per prefill program; sized to stay out
    of local memory. 16-bit, head <= 128: 64 x 64 with 4 warps and 2 stages, the fastest of
    nine tiles swept on an H200 at 1x512, 2k and 8k tokens and within 6% at 16x512
    (``benchmarks/kernels/gpuperf_probe.py``, Llama-8B heads, CUDA graph, 2026-12-04: 16.4 /
    166 / 132 / 1,526 us against 18.1 / 182.5 / 151 / 1,680 with 128 x 64, 8 warps; SDPA flash
    20.6 / 183 / 165 / 1,739): twice the programs of 128-row tiles, so short prompts fill
    more of the GPU, and no register pressure from 8-warp 128 x 128 accumulators."""
    if dtype == torch.float32:
        return (32, 32, 4, 2) if head_size <= 128 else (32, 16, 8, 2)
    return (64, 64, 4, 2) if head_size <= 128 else (64, 32, 8, 2)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      out: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                      block_tables: torch.Tensor, scale: float, *, seq_offset: int,
                      num_seqs: int, max_query_len: int,
                      sliding_window: Optional[int] = None,
                      tiles: Optional[tuple[int, int, int, int]] = None,
                      k_scale: float = 1.0, v_scale: float = 1.0,
                      fp8_convert: str = "auto", logit_softcap: Optional[float] = None,
                      sinks: Optional[torch.Tensor] = None,
                      key_limits: Optional[torch.Tensor] = None) -> None:
    """Causal attention of sequences ``seq_offset .. seq_offset + num_seqs - 1`` of the flat
    batch over their paged context; writes their rows of ``out`` ``[T, H, D]``.
    ``logit_softcap``: scores become ``cap * tanh(scale * q.k / cap)`` (None: no cap).
    ``sinks``: float ``[H]`` attention sinks, one logit per head in each row's softmax
    denominator (None: none). ``key_limits``: int ``[T]``, the last key each row sees
    (``AttentionBatch.key_limits``; None: causal).
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
    block_m, block_n, num_warps, num_stages = tiles or _prefill_tiles(q.dtype, head_size)
    block_m = max(block_m, group_p2)
    block_m = min(block_m, max(16, group_p2 * _p2(max_query_len)))  # short chunks: small tiles
    block_q = block_m // group_p2
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), num_kv_heads)
    _prefill_kernel[grid](
        q, k_cache, v_cache, out, q if sinks is None else sinks,
        query_start_loc if key_limits is None else key_limits, query_start_loc, seq_lens,
        block_tables, seq_offset, scale * _LOG2E * _k_factor(k_cache, k_scale), _v_factor(v_cache, v_scale),
        sliding_window or 0, _softcap_log2(logit_softcap),
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), block_tables.stride(0),
        GROUP=group, GROUP_P2=group_p2, BLOCK_Q=block_q, BLOCK_M=block_m, BLOCK_N=block_n,
        HEAD_SIZE=head_size, BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q),
        FP8_PTX=_fp8_ptx(q, k_cache, fp8_convert), SOFTCAP=logit_softcap is not None,
        SINKS=sinks is not None, KEY_LIMITS=key_limits is not None, num_warps=num_warps,
        num_stages=num_stages)
