"""Multi-head latent attention (``AttentionSpec.mla_value_size``, DeepSeek-V2/V3) in Triton:
the cache write of the latent rows and one attention kernel for decodes and prefill chunks.

The cache holds one row a token, ``[c_kv (DV) | k_pe (DR)]`` (``[num_blocks, block_size, 1,
DV + DR]``, 512 + 64 for the released models); every query head attends over those rows and
takes the ``c_kv`` part as its value. Neither part is a power of two wide in general, so the
kernel loads them as two tiles, each padded to a power of two and masked::

    q rows (BLOCK_Q queries x BLOCK_H heads):  q_c [BLOCK_M, DV_P2]   q_r [BLOCK_M, DR_P2]
    key tile (BLOCK_N rows of the cache):      kc  [BLOCK_N, DV_P2]   kr  [BLOCK_N, DR_P2]
    scores = q_c kc^T + q_r kr^T;  online softmax;  acc += p kc      (values = kc)

Grid ``(num_seqs, cdiv(max_query_len, BLOCK_Q), cdiv(H, BLOCK_H))``: a decode is one query; a
prefill chunk's queries come ``BLOCK_Q`` at a time, each row masked to the keys at or before its
position. Every query head shares the one KV row (MQA), so a head block reads each key tile
once for all its heads. No host sync (graph-capture safe): a sequence of length 0 (graph
padding) writes zeros.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import _LOG2E, _NEG_BIG, _dot_fp32, _dot_precision, _p2


@triton.jit
def _mla_cache_kernel(k_ptr, cache_ptr, slot_ptr, stride_kt, stride_cb, stride_ct,
                      D: tl.constexpr, D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """One token a program: its latent row to its slot (-1: none)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, D_P2)
    row = tl.load(k_ptr + t * stride_kt + d, mask=d < D)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    tl.store(dst + d, row.to(cache_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _mla_kernel(q_ptr, cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
                scale_log2, num_heads, stride_qt, stride_qh, stride_ot, stride_oh,
                stride_cb, stride_ct, stride_bt,
                DV: tl.constexpr, DV_P2: tl.constexpr, DR: tl.constexpr, DR_P2: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    """DOT_FP32: tiles widened to float32 before the dots (bf16 in the interpreter, which has
    no bf16 arithmetic: ``common._dot_fp32``)."""
    s = tl.program_id(0)
    qb = tl.program_id(1)
    hb = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + s)
    q_len = tl.load(query_start_loc_ptr + s + 1) - q_start
    if qb * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + s)
    ctx_len = seq_len - q_len
    rows = tl.arange(0, BLOCK_Q * BLOCK_H)
    tq = qb * BLOCK_Q + rows // BLOCK_H  # query index inside the sequence
    head = hb * BLOCK_H + rows % BLOCK_H
    row_ok = (tq < q_len) & (head < num_heads)
    q_pos = ctx_len + tq
    tok = (q_start + tq).to(tl.int64)
    dv = tl.arange(0, DV_P2)
    dr = tl.arange(0, DR_P2)
    q_row = q_ptr + tok * stride_qt + head * stride_qh
    q_c = tl.load(q_row[:, None] + dv[None, :], mask=row_ok[:, None] & (dv < DV)[None, :],
                  other=0.0)
    q_r = tl.load(q_row[:, None] + DV + dr[None, :], mask=row_ok[:, None] & (dr < DR)[None, :],
                  other=0.0)
    if DOT_FP32:
        q_c, q_r = q_c.to(tl.float32), q_r.to(tl.float32)
    m_i = tl.full([BLOCK_Q * BLOCK_H], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_Q * BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_Q * BLOCK_H, DV_P2], tl.float32)
    bt_ptr = block_tables_ptr + s.to(tl.int64) * stride_bt
    hi = tl.minimum(seq_len, ctx_len + (qb + 1) * BLOCK_Q)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        blk = tl.load(bt_ptr + n // BLOCK_SIZE, mask=n_ok, other=0).to(tl.int64)
        key = cache_ptr + blk * stride_cb + (n % BLOCK_SIZE) * stride_ct
        kc = tl.load(key[:, None] + dv[None, :], mask=n_ok[:, None] & (dv < DV)[None, :],
                     other=0.0)
        kr = tl.load(key[:, None] + DV + dr[None, :], mask=n_ok[:, None] & (dr < DR)[None, :],
                     other=0.0)
        if DOT_FP32:
            kc, kr = kc.to(tl.float32), kr.to(tl.float32)
        scores = tl.dot(q_c, tl.trans(kc), input_precision=DOT_PREC)
        scores += tl.dot(q_r, tl.trans(kr), input_precision=DOT_PREC)
        visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores * scale_log2, _NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(visible, tl.exp2(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(kc.dtype), kc, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_row = out_ptr + tok * stride_ot + head * stride_oh
    tl.store(out_row[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :])


@dataclass
class TritonMLAMetadata:
    num_seqs: int
    max_query_len: int
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1: not written


class TritonMLAAttentionKernel:
    """``AttentionKernel`` for MLA specs on this module's kernels (cuda, rocm)."""

    name = "triton-mla"
    supports_mla = True
    supports_sliding_window = False
    supports_graph_capture = True  # no host sync; the grid depends on host ints of the batch
    kv_cache_dtypes = ("auto",)
    block_h = 16  # query heads a program: tl.dot wants at least 16 rows
    block_n = 32  # keys a tile

    def __init__(self, spec):
        if spec.mla_value_size is None or spec.num_kv_heads != 1:
            raise ValueError("TritonMLAAttentionKernel serves MLA specs (mla_value_size set, one "
                             "KV head) only.")
        if spec.kv_cache_dtype not in self.kv_cache_dtypes:
            raise ValueError(f"Triton MLA attention supports kv_cache_dtype "
                             f"{', '.join(self.kv_cache_dtypes)}; got {spec.kv_cache_dtype!r}.")
        self.spec = spec
        self.value_size = spec.mla_value_size
        self.rope_size = spec.head_size - spec.mla_value_size

    def build_metadata(self, batch) -> TritonMLAMetadata:
        return TritonMLAMetadata(batch.num_seqs, batch.max_query_len, batch.query_start_loc,
                                 batch.seq_lens, batch.block_tables, batch.slot_mapping)

    def forward(self, q, k, v, k_cache, v_cache, metadata: TritonMLAMetadata, scale):
        t, h, d = q.shape
        out = torch.empty(t, h, self.value_size, dtype=q.dtype, device=q.device)
        if t == 0:
            return out
        k = k.reshape(t, d)
        _mla_cache_kernel[(t,)](k, k_cache, metadata.slot_mapping, k.stride(0), k_cache.stride(0),
                                k_cache.stride(1), D=d, D_P2=_p2(d),
                                BLOCK_SIZE=k_cache.shape[1])
        block_h, dv_p2 = self.block_h, _p2(self.value_size)
        # Rows a program: BLOCK_Q queries x BLOCK_H heads, its accumulator [rows, DV_P2] float32
        # in registers; at the released models' 512 one query a program (not timed on a GPU).
        block_q = 1 if dv_p2 * block_h > 4096 else min(_p2(metadata.max_query_len), 4)
        grid = (metadata.num_seqs, triton.cdiv(metadata.max_query_len, block_q),
                triton.cdiv(h, block_h))
        _mla_kernel[grid](
            q, k_cache, out, metadata.query_start_loc, metadata.seq_lens, metadata.block_tables,
            scale * _LOG2E, h, q.stride(0), q.stride(1), out.stride(0), out.stride(1),
            k_cache.stride(0), k_cache.stride(1), metadata.block_tables.stride(0),
            DV=self.value_size, DV_P2=dv_p2, DR=self.rope_size,
            DR_P2=max(16, _p2(self.rope_size)), BLOCK_Q=block_q, BLOCK_H=block_h,
            BLOCK_N=self.block_n, BLOCK_SIZE=k_cache.shape[1],
            DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q),
            num_warps=8 if dv_p2 > 128 else 4)
        return out
