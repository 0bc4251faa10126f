"""Split-KV paged decode attention: grid ``(num_decodes, KVH, num_splits)``; with one split
the split kernel writes the output itself, with more ``_decode_reduce_kernel`` combines the
partials. See ``tessellm.kernels.attention`` for the split arithmetic.

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
    _LOG2E, _NEG_BIG, _attend_tile, _check_cache, _dot_fp32, _dot_precision,
    _fp8_ptx, _k_factor, _load_q, _p2, _v_factor)
from tessellm.kernels.pdl import pdl_args, pdl_start


@triton.jit
def _decode_split_kernel(q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, part_out_ptr, part_m_ptr,
                         part_l_ptr, query_start_loc_ptr, seq_lens_ptr,
                         block_tables_ptr, scale_log2, v_scale, window,
                         stride_qt, stride_qh, stride_ot, stride_oh,
                         stride_cb, stride_ct, stride_ch, stride_bt,
                         NUM_HEADS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr,
                         QUERY_LEN: tl.constexpr, GROUP_P2: tl.constexpr,
                         NUM_SPLITS: tl.constexpr, MIN_PART: tl.constexpr,
                         BLOCK_N: tl.constexpr, HEAD_SIZE: tl.constexpr,
                         BLOCK_SIZE: tl.constexpr, USE_WINDOW: tl.constexpr,
                         DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr, FP8_PTX: tl.constexpr,
                         REDUCE: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid ``(num_decodes, KVH, NUM_SPLITS)``. Each split's normalized partial output, running
    max (log2 units) and sum of exponentials go where ``REDUCE`` says (``_REDUCE_*``): to the
    workspace for ``_decode_reduce_kernel`` (SEPARATE), or straight to ``out`` (DIRECT, one
    split). QUERY_LEN query tokens per sequence (module docstring), rows ``tq * GROUP_P2 + g``."""
    pdl_start(USE_PDL)
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
    q, qk_scale = _load_q(q_ptr, tok, head, d, row_ok, stride_qt, stride_qh, scale_log2,
                          DOT_FP32, FP8_PTX)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_SIZE], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(start, end, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < end
        mask = (rows[:, None] >= 0) & n_ok[None, :]  # a decode's query sees every key < seq_len
        if QUERY_LEN > 1:  # causal among the step's queries
            mask = mask & (n[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                mask = mask & (n[None, :] > q_pos[:, None] - window)
        acc, m_i, l_i = _attend_tile(q, acc, m_i, l_i, k_cache_ptr, v_cache_ptr, bt_ptr, n, n_ok,
                                     mask, kvh, qk_scale, stride_cb, stride_ct, stride_ch,
                                     HEAD_SIZE, BLOCK_SIZE, DOT_PREC, True, FP8_PTX)
    acc = acc * (v_scale / tl.where(l_i > 0, l_i, 1.0))[:, None]
    if REDUCE == 1:  # _REDUCE_DIRECT: the only split's partial is the output
        tl.store(out_ptr + (tok * stride_ot + head * stride_oh)[:, None] + d[None, :],
                 acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None])
    else:
        idx = ((s.to(tl.int64) * QUERY_LEN + tq) * NUM_HEADS + head) * NUM_SPLITS + split
        tl.store(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :], acc, mask=row_ok[:, None])
        tl.store(part_m_ptr + idx, m_i, mask=row_ok)
        tl.store(part_l_ptr + idx, l_i, mask=row_ok)


@triton.jit
def _decode_reduce_kernel(out_ptr, part_out_ptr, part_m_ptr, part_l_ptr, query_start_loc_ptr,
                          stride_ot, stride_oh,
                          NUM_HEADS: tl.constexpr, NUM_SPLITS: tl.constexpr,
                          HEAD_SIZE: tl.constexpr, QUERY_LEN: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """Grid ``(num_decodes * QUERY_LEN, H)``: out = sum_i w_i o_i / sum_i w_i,
    w_i = 2^(m_i - M) l_i."""
    pdl_start(USE_PDL)
    sq = tl.program_id(0)  # sequence * QUERY_LEN + query
    h = tl.program_id(1)
    tok = tl.load(query_start_loc_ptr + sq // QUERY_LEN).to(tl.int64) + sq % QUERY_LEN
    sp = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, HEAD_SIZE)
    idx = (sq.to(tl.int64) * NUM_HEADS + h) * NUM_SPLITS + sp
    m = tl.load(part_m_ptr + idx)
    l = tl.load(part_l_ptr + idx)
    w = tl.exp2(m - tl.max(m, 0)) * l
    denom = tl.sum(w, 0)
    o = tl.load(part_out_ptr + idx[:, None] * HEAD_SIZE + d[None, :])
    out = tl.sum(w[:, None] * o, 0) / tl.where(denom > 0, denom, 1.0)
    tl.store(out_ptr + tok * stride_ot + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def _decode_block_n(dtype, head_size: int) -> int:
    if dtype == torch.float32:
        return 32 if head_size <= 128 else 16
    return 64 if head_size <= 128 else 32


def decode_workspace_numel(num_seqs: int, num_heads: int, num_splits: int, head_size: int,
                           query_len: int = 1) -> int:
    """float32 elements of workspace ``decode_attention`` needs: partial outs, maxes, sums."""
    return num_seqs * query_len * num_heads * num_splits * (head_size + 2)


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
                     fp8_convert: str = "auto", fused_reduce: bool = True,
                     query_len: int = 1) -> None:
    """Split-KV attention of the first ``num_seqs`` sequences, ``query_len`` query tokens each
    (1: decodes; more: verify steps, the last ``query_len`` positions of each sequence, rows
    ``query_start_loc[s] ..`` consecutive).

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
    n_part = num_seqs * query_len * num_heads * num_splits
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
        NUM_HEADS=num_heads, GROUP=group, BLOCK_M=max(16, _p2(group) * _p2(query_len)),
        QUERY_LEN=query_len, GROUP_P2=_p2(group), NUM_SPLITS=num_splits,
        MIN_PART=max(min_partition, block_n), BLOCK_N=block_n, HEAD_SIZE=head_size,
        BLOCK_SIZE=k_cache.shape[1], USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q), FP8_PTX=fp8_ptx,
        REDUCE=reduce, num_warps=num_warps, num_stages=num_stages, **pdl_args(q.device))
    if reduce == _REDUCE_SEPARATE:
        _decode_reduce_kernel[(num_seqs * query_len, num_heads)](
            out, part_out, part_m, part_l, query_start_loc, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, NUM_SPLITS=num_splits, HEAD_SIZE=head_size,
            QUERY_LEN=query_len, num_warps=4,
            **pdl_args(q.device))
