"""MLA prefill in the expanded form: each prefill sequence's cached latent rows are decompressed
into per-head keys and values (``kv_b_proj``, by the model) and attended like multi-head
attention, as vLLM and SGLang do for prefill; decodes keep the absorbed form (``mla_decode``).

Why, per head and per (query, key) pair of a causal prefill (DeepSeek-V2/V3: n = 128 nope,
r = 64 rope, v = 128 value dims, c = 512 latent; H heads)::

    absorbed:  scores over c + r = 576, values over c = 512        1,088 multiply-adds a pair
    expanded:  scores over n + r = 192, values over v = 128          320 multiply-adds a pair
               + decompressing each key once: c x H (n + v) = 131k H multiply-adds a key

so for a chunk of Q queries over L keys the expanded form costs ``320 H Q L + 131k H L``
against ``1,088 H Q L``: it wins once Q > 131k / 768, about 170 queries, and at 2k queries it
does 2.4x less work (3.4x for long chunks); the absorbed form also runs a 512-wide accumulator
that leaves Triton one query of 16 heads a program. Short chunks (speculative verify steps, the
tail of a prompt) stay absorbed: ``TritonMLAAttentionKernel.expanded_min_query``.

Layout: queries ``q`` ``[T, H, n + r]`` (the rope part rotated), keys of every expanded
sequence's whole context in one flat list ``cu_k``::

    k_nope [K, H, n]   v [K, H, v]   k_pe [K, r] (one for all heads: the latent row's tail)
    sequence s: keys cu_k[s] .. cu_k[s+1]-1, positions 0 .. seq_len-1;
                queries cu_q[s] .. cu_q[s+1]-1 at positions seq_len - q_len .. seq_len-1

Grid ``(num_seqs, cdiv(max_query_len, BLOCK_M), H)``: ``BLOCK_M`` queries of one head a
program, each row seeing the keys at or before its position.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import _LOG2E, _NEG_BIG, _dot_fp32, _dot_precision, _p2


@triton.jit
def _mla_prefill_kernel(q_ptr, kn_ptr, kr_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, scale_log2,
                        stride_qt, stride_qh, stride_knt, stride_knh, stride_krt, stride_vt,
                        stride_vh, stride_ot, stride_oh,
                        DN: tl.constexpr, DN_P2: tl.constexpr, DR: tl.constexpr,
                        DR_P2: tl.constexpr, DV: tl.constexpr, DV_P2: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                        DOT_FP32: tl.constexpr):
    s = tl.program_id(0)
    qb = tl.program_id(1)
    h = tl.program_id(2).to(tl.int64)
    q_start = tl.load(cu_q_ptr + s)
    q_len = tl.load(cu_q_ptr + s + 1) - q_start
    if qb * BLOCK_M >= q_len:
        return
    k_start = tl.load(cu_k_ptr + s)
    seq_len = tl.load(cu_k_ptr + s + 1) - k_start
    ctx_len = seq_len - q_len
    i = qb * BLOCK_M + tl.arange(0, BLOCK_M)
    i_ok = i < q_len
    q_pos = ctx_len + i
    dn = tl.arange(0, DN_P2)
    dr = tl.arange(0, DR_P2)
    dv = tl.arange(0, DV_P2)
    q_row = q_ptr + (q_start + i).to(tl.int64) * stride_qt + h * stride_qh
    q_n = tl.load(q_row[:, None] + dn[None, :], mask=i_ok[:, None] & (dn < DN)[None, :],
                  other=0.0)
    q_r = tl.load(q_row[:, None] + DN + dr[None, :], mask=i_ok[:, None] & (dr < DR)[None, :],
                  other=0.0)
    if DOT_FP32:
        q_n, q_r = q_n.to(tl.float32), q_r.to(tl.float32)
    m_i = tl.full([BLOCK_M], _NEG_BIG, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_P2], tl.float32)
    hi = tl.minimum(seq_len, ctx_len + (qb + 1) * BLOCK_M)
    for n0 in range(0, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        n_ok = n < hi
        key = (k_start + n).to(tl.int64)
        kn = tl.load(kn_ptr + (key * stride_knt + h * stride_knh)[:, None] + dn[None, :],
                     mask=n_ok[:, None] & (dn < DN)[None, :], other=0.0).to(q_n.dtype)
        kr = tl.load(kr_ptr + (key * stride_krt)[:, None] + dr[None, :],
                     mask=n_ok[:, None] & (dr < DR)[None, :], other=0.0).to(q_n.dtype)
        v = tl.load(v_ptr + (key * stride_vt + h * stride_vh)[:, None] + dv[None, :],
                    mask=n_ok[:, None] & (dv < DV)[None, :], other=0.0).to(q_n.dtype)
        scores = tl.dot(q_n, tl.trans(kn), input_precision=DOT_PREC)
        scores += tl.dot(q_r, tl.trans(kr), input_precision=DOT_PREC)
        visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        scores = tl.where(visible, scores * scale_log2, _NEG_BIG)
        m_new = tl.maximum(m_i, tl.max(scores, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.where(visible, tl.exp2(scores - m_new[:, None]), 0.0)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    acc = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_row = out_ptr + (q_start + i).to(tl.int64) * stride_ot + h * stride_oh
    tl.store(out_row[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=i_ok[:, None] & (dv < DV)[None, :])


def mla_prefill_expanded(q: torch.Tensor, k_nope: torch.Tensor, k_pe: torch.Tensor,
                         v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                         max_query_len: int, scale: float, block_m: int = 64,
                         block_n: int = 64) -> torch.Tensor:
    """Causal attention of ``q`` ``[T, H, n + r]`` over ``k_nope`` ``[K, H, n]`` | ``k_pe``
    ``[K, r]`` with values ``v`` ``[K, H, v]``, sequences cut by ``cu_q``/``cu_k`` (int32
    ``[S + 1]``, each sequence's queries the last of its keys): ``[T, H, v]`` in q's dtype."""
    t, h, _ = q.shape
    dn, dr, dv = k_nope.shape[-1], k_pe.shape[-1], v.shape[-1]
    out = torch.empty(t, h, dv, dtype=q.dtype, device=q.device)
    if t == 0:
        return out
    block_m = min(block_m, max(16, _p2(max_query_len)))
    grid = (cu_q.shape[0] - 1, triton.cdiv(max_query_len, block_m), h)
    _mla_prefill_kernel[grid](
        q, k_nope, k_pe, v, out, cu_q, cu_k, scale * _LOG2E, q.stride(0), q.stride(1),
        k_nope.stride(0), k_nope.stride(1), k_pe.stride(0), v.stride(0), v.stride(1),
        out.stride(0), out.stride(1), DN=dn, DN_P2=max(16, _p2(dn)), DR=dr,
        DR_P2=max(16, _p2(dr)), DV=dv, DV_P2=max(16, _p2(dv)), BLOCK_M=block_m,
        BLOCK_N=block_n, DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q),
        num_warps=4 if block_m <= 32 else 8)
    return out
