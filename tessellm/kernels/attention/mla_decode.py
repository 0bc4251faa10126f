"""Split-KV (flash-decoding) MLA decode: one query token a sequence, ``BLOCK_H`` heads a program
sharing every latent tile it reads (all heads of a request attend over the same rows, so a tile
loaded once serves ``BLOCK_H`` heads, as FlashMLA's head blocks do).

Grid ``(num_decodes, num_splits, cdiv(H, BLOCK_H))``. A sequence of length L is cut into parts
of ``roundup(cdiv(L, num_splits), BLOCK_N)`` keys; split ``j`` walks ``[j * part, (j + 1) *
part)``::

    keys:   0 ......... part ......... 2 part ..... L-1      (num_splits 3)
            [ split 0  ][   split 1   ][  split 2  ]
    each:   m_j, l_j, acc_j = online softmax over its keys, BLOCK_H heads x Dv values
    reduce: m = max_j m_j;  out = sum_j 2^(m_j - m) acc_j / sum_j 2^(m_j - m) l_j

With one split the program writes the output itself (no workspace, no reduce launch). A split
past L (short sequence, graph padding of length 0) writes (acc 0, m -1e30, l 0), which the
reduce weighs as zero; a sequence with no key gives 0, never NaN. No host sync: ``num_splits``
is a host int of the batch size (graph-capture safe).

fp8 rows: loaded e4m3 and widened to the dot dtype; ``k_scale`` is folded into the softmax scale
and into the output (keys and values are the same rows, one scale).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import _NEG_BIG


@triton.jit
def attend_latent_tile(q_c, q_r, acc, m_i, l_i, cache_ptr, bt_ptr, n, n_ok, visible, scale_log2,
                       stride_cb, stride_ct, DV: tl.constexpr, DV_P2: tl.constexpr,
                       DR: tl.constexpr, DR_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                       DOT_PREC: tl.constexpr):
    """One online-softmax step of the rows ``q_c | q_r`` over the latent rows of keys ``n``
    (``[BLOCK_N]``, ``n_ok`` those that exist): the tile is loaded once for every row, widened
    to q's dtype, and serves as keys (both parts) and values (``kc``). ``visible``: which keys
    each row sees (broadcastable to ``[rows, BLOCK_N]``)."""
    dv = tl.arange(0, DV_P2)
    dr = tl.arange(0, DR_P2)
    blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
    key = cache_ptr + blk * stride_cb + (n % BLOCK_SIZE) * stride_ct
    kc = tl.load(key[:, None] + dv[None, :], mask=n_ok[:, None] & (dv < DV)[None, :], other=0.0)
    kr = tl.load(key[:, None] + DV + dr[None, :], mask=n_ok[:, None] & (dr < DR)[None, :],
                 other=0.0)
    kc, kr = kc.to(q_c.dtype), kr.to(q_c.dtype)
    scores = tl.dot(q_c, tl.trans(kc), input_precision=DOT_PREC)
    scores += tl.dot(q_r, tl.trans(kr), input_precision=DOT_PREC)
    scores = tl.where(visible, scores * scale_log2, _NEG_BIG)
    m_new = tl.maximum(m_i, tl.max(scores, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.where(visible, tl.exp2(scores - m_new[:, None]), 0.0)
    acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc, input_precision=DOT_PREC)
    return acc, m_new, l_i * alpha + tl.sum(p, 1)


@triton.jit
def _mla_decode_split_kernel(q_ptr, cache_ptr, out_ptr, ws_ptr, seq_lens_ptr, block_tables_ptr,
                             scale_log2, v_factor, num_heads, stride_qt, stride_qh, stride_ot,
                             stride_oh, stride_cb, stride_ct, stride_bt,
                             DV: tl.constexpr, DV_P2: tl.constexpr, DR: tl.constexpr,
                             DR_P2: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                             DOT_PREC: tl.constexpr, WIDEN: tl.constexpr):
    """WIDEN: tiles go to float32 before the dots (float32 q, bf16 in the interpreter, fp8
    rows); else they stay in the 16-bit dtype of q. Workspace rows (NUM_SPLITS > 1):
    ``[s, split, head] -> (acc [DV_P2], m, l)``."""
    s = tl.program_id(0)
    split = tl.program_id(1)
    hb = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + s)
    part = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    lo = split * part
    hi = tl.minimum(seq_len, lo + part)
    head = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    head_ok = head < num_heads
    dv = tl.arange(0, DV_P2)
    dr = tl.arange(0, DR_P2)
    q_row = q_ptr + s.to(tl.int64) * stride_qt + head * stride_qh
    q_c = tl.load(q_row[:, None] + dv[None, :], mask=head_ok[:, None] & (dv < DV)[None, :],
                  other=0.0)
    q_r = tl.load(q_row[:, None] + DV + dr[None, :], mask=head_ok[:, None] & (dr < DR)[None, :],
                  other=0.0)
    if WIDEN:
        q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)
    m_i = tl.full([BLOCK_H], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, DV_P2], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        acc, m_i, l_i = attend_latent_tile(q_c, q_r, acc, m_i, l_i, cache_ptr, bt_ptr, n, n_ok,
                                           n_ok[None, :], scale_log2, stride_cb, stride_ct,
                                           DV, DV_P2, DR, DR_P2, BLOCK_SIZE, DOT_PREC)
    if NUM_SPLITS == 1:
        acc = acc * (v_factor / tl.where(l_i > 0, l_i, 1.0))[:, None]
        out_row = out_ptr + s.to(tl.int64) * stride_ot + head * stride_oh
        tl.store(out_row[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty),
                 mask=head_ok[:, None] & (dv < DV)[None, :])
    else:
        row = (s.to(tl.int64) * NUM_SPLITS + split) * num_heads + head  # [BLOCK_H]
        ws_row = ws_ptr + row * (DV_P2 + 2)
        tl.store(ws_row[:, None] + dv[None, :], acc, mask=head_ok[:, None])
        tl.store(ws_row + DV_P2, m_i, mask=head_ok)
        tl.store(ws_row + DV_P2 + 1, l_i, mask=head_ok)


@triton.jit
def _mla_decode_reduce_kernel(ws_ptr, out_ptr, v_factor, num_heads, stride_ot, stride_oh,
                              DV: tl.constexpr, DV_P2: tl.constexpr, NUM_SPLITS: tl.constexpr,
                              SPLITS_P2: tl.constexpr):
    """One (sequence, head) a program: the splits' partials combined (module docstring)."""
    s = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    j = tl.arange(0, SPLITS_P2)
    j_ok = j < NUM_SPLITS
    rows = ws_ptr + ((s * NUM_SPLITS + j) * num_heads + h) * (DV_P2 + 2)
    m = tl.load(rows + DV_P2, mask=j_ok, other=_NEG_BIG)
    l = tl.load(rows + DV_P2 + 1, mask=j_ok, other=0.0)
    m_all = tl.max(m, 0)
    w = tl.where(j_ok, tl.exp2(m - m_all), 0.0)
    denom = tl.sum(w * l, 0)
    dv = tl.arange(0, DV_P2)
    acc = tl.load(rows[:, None] + dv[None, :], mask=j_ok[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) * (v_factor / tl.where(denom > 0, denom, 1.0))
    tl.store(out_ptr + s * stride_ot + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty),
             mask=dv < DV)


def mla_decode(q: torch.Tensor, cache: torch.Tensor, out: torch.Tensor, seq_lens: torch.Tensor,
               block_tables: torch.Tensor, scale_log2: float, v_factor: float, *,
               num_decodes: int, num_splits: int, value_size: int, block_h: int = 16,
               block_n: int = 32, dot_precision: str = "tf32", widen: bool = False,
               num_warps: int = 8) -> None:
    """The first ``num_decodes`` rows of ``q`` ``[T, H, D]`` (one query each, sequences 0..n-1
    of ``seq_lens``/``block_tables``) over their cached latent rows, into ``out[:num_decodes]``
    ``[., H, value_size]``. ``scale_log2``: the softmax scale (times an fp8 cache's ``k_scale``)
    times log2(e); ``v_factor``: the output's factor (an fp8 cache's ``k_scale``, else 1)."""
    h, d = q.shape[1], q.shape[2]
    dv_p2 = triton.next_power_of_2(value_size)
    dr = d - value_size
    ws = out  # unused with one split
    if num_splits > 1:
        ws = torch.empty(num_decodes * num_splits * h * (dv_p2 + 2), dtype=torch.float32,
                         device=q.device)
    grid = (num_decodes, num_splits, triton.cdiv(h, block_h))
    _mla_decode_split_kernel[grid](
        q, cache, out, ws, seq_lens, block_tables, scale_log2, v_factor, h, q.stride(0),
        q.stride(1), out.stride(0), out.stride(1), cache.stride(0), cache.stride(1),
        block_tables.stride(0), DV=value_size, DV_P2=dv_p2, DR=dr,
        DR_P2=max(16, triton.next_power_of_2(dr)), BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_SIZE=cache.shape[1], NUM_SPLITS=num_splits, DOT_PREC=dot_precision, WIDEN=widen,
        num_warps=num_warps)
    if num_splits > 1:
        _mla_decode_reduce_kernel[(num_decodes, h)](
            ws, out, v_factor, h, out.stride(0), out.stride(1), DV=value_size, DV_P2=dv_p2,
            NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits),
            num_warps=4)
