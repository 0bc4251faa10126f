"""Multi-head latent attention (``AttentionSpec.mla_value_size``, DeepSeek-V2/V3) in Triton:
the cache write of the latent rows, the split-KV decode (``mla_decode.py``), the expanded
prefill (``mla_prefill.py``) and one kernel for short chunks and verify steps.

The cache holds one row a token, ``[c_kv (DV) | k_pe (DR)]`` (``[num_blocks, block_size, 1,
DV + DR]``, 512 + 64 for the released models); every query head attends over those rows and
takes the ``c_kv`` part as its value. Neither part is a power of two wide in general, so the
kernels load them as two tiles, each padded to a power of two and masked::

    q rows (BLOCK_Q queries x BLOCK_H heads):  q_c [BLOCK_M, DV_P2]   q_r [BLOCK_M, DR_P2]
    key tile (BLOCK_N rows of the cache):      kc  [BLOCK_N, DV_P2]   kr  [BLOCK_N, DR_P2]
    scores = q_c kc^T + q_r kr^T;  online softmax;  acc += p kc      (values = kc)

Decodes (the batch's first ``num_decodes`` sequences, one query each) take ``mla_decode``:
``BLOCK_H`` heads a program share each latent tile, the keys split over ``num_splits`` programs
a sequence (flash-decoding) so that a small batch fills the GPU. A step whose prefill chunks
reach ``expanded_min_query`` queries runs them in the expanded form (``mla_prefill.py`` gives
the arithmetic; the model decompresses ``context_rows`` with ``kv_b_proj`` and calls
``forward_expanded``). Other chunks and verify steps take ``_mla_kernel``: grid ``(num_seqs,
cdiv(max_query_len, BLOCK_Q), cdiv(H, BLOCK_H))``, a chunk's queries ``BLOCK_Q`` at a time, each
row masked to the keys at or before its position. No host sync in decode steps (graph-capture
safe): a sequence of length 0 (graph padding) writes zeros.

fp8 latent rows (``kv_cache_dtype='fp8'``): the cache write stores ``row / k_scale`` saturated
at +-448 in e4m3 (one scale per cache, ``k_scale``, 1.0 unless set); the kernels widen each tile
and fold ``k_scale`` into the softmax scale and into the output (keys and values are one row).
Per-tensor, not per-row: a per-row scale needs 4 more bytes a row beside the cache (a second
tensor the engine would allocate and every kernel read) and buys nothing for values inside
e4m3's normal range (2^-6 .. 448: 3 mantissa bits whatever the scale); ``c_kv`` comes out of
``kv_a_layernorm``, so its rows sit at the norm weight's scale.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.attention.common import (_LOG2E, _NEG_BIG, _dot_fp32, _dot_precision,
                                               _fp8_max, _is_fp8, _p2)
from tessellm.kernels.attention.mla_decode import attend_latent_tile, mla_decode
from tessellm.kernels.attention.mla_prefill import mla_prefill_expanded


@triton.jit
def _round_e4m3(x):
    """float32 ``x`` (within +-448) rounded half-to-even onto the e4m3fn grid (3 mantissa bits,
    normal exponents from -6, subnormal steps of 2^-9), so the cast to e4m3 that follows is
    exact. The same result as the GPU's ``cvt.rn.satfinite`` cast; done by hand because
    Triton's interpreter rounds some values across a binade wrongly (0.4996 -> 0.25)."""
    bits = x.to(tl.int32, bitcast=True)
    exp = tl.maximum(((bits >> 23) & 0xFF) - 127, -6)
    step = ((exp - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(exp - 3)
    y = x / step  # exact: a power-of-two division
    f = tl.floor(y)
    up = (y - f > 0.5) | ((y - f == 0.5) & (f - 2.0 * tl.floor(f * 0.5) == 1.0))
    r = tl.where(up, f + 1.0, f) * step
    return tl.where(r == 0.0, x * 0.0, r)  # a negative value rounding to zero keeps its sign


@triton.jit
def _mla_cache_kernel(k_ptr, cache_ptr, slot_ptr, stride_kt, stride_cb, stride_ct, inv_k_scale,
                      D: tl.constexpr, D_P2: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                      FP8: tl.constexpr, FP8_MAX: tl.constexpr):
    """One token a program: its latent row to its slot (-1: none); fp8: ``row / k_scale``,
    saturated (e4m3 has no infinity)."""
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    d = tl.arange(0, D_P2)
    row = tl.load(k_ptr + t * stride_kt + d, mask=d < D)
    if FP8:
        row = tl.minimum(tl.maximum(row.to(tl.float32) * inv_k_scale, -FP8_MAX), FP8_MAX)
        row = _round_e4m3(row)
    dst = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + (slot % BLOCK_SIZE) * stride_ct
    tl.store(dst + d, row.to(cache_ptr.dtype.element_ty), mask=d < D)


@triton.jit
def _mla_kernel(q_ptr, cache_ptr, out_ptr, query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
                seq_offset, scale_log2, v_factor, num_heads, stride_qt, stride_qh, stride_ot,
                stride_oh, stride_cb, stride_ct, stride_bt,
                DV: tl.constexpr, DV_P2: tl.constexpr, DR: tl.constexpr, DR_P2: tl.constexpr,
                BLOCK_Q: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr,
                BLOCK_SIZE: tl.constexpr, DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    """DOT_FP32: tiles widened to float32 before the dots (bf16 in the interpreter, which has
    no bf16 arithmetic: ``common._dot_fp32``); other tiles (fp8 rows) take q's dtype.
    Sequences ``seq_offset + program_id(0)``; ``v_factor``: the output's factor (fp8)."""
    s = seq_offset + tl.program_id(0)
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
        visible = n_ok[None, :] & (n[None, :] <= q_pos[:, None])
        acc, m_i, l_i = attend_latent_tile(q_c, q_r, acc, m_i, l_i, cache_ptr, bt_ptr, n, n_ok,
                                           visible, scale_log2, stride_cb, stride_ct, DV, DV_P2,
                                           DR, DR_P2, BLOCK_SIZE, DOT_PREC)
    acc = acc * (v_factor / tl.where(l_i > 0, l_i, 1.0))[:, None]
    out_row = out_ptr + tok * stride_ot + head * stride_oh
    tl.store(out_row[:, None] + dv[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (dv < DV)[None, :])


@dataclass
class TritonMLAMetadata:
    num_seqs: int
    num_decodes: int  # the first num_decodes sequences: one query each, ``mla_decode``
    num_splits: int  # decode splits a sequence; a function of num_decodes only
    max_query_len: int  # bounds the chunk kernel's grid
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1]
    seq_lens: torch.Tensor  # int32 [num_seqs]
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks]
    slot_mapping: torch.Tensor  # int64 [num_tokens]; -1: not written
    # The prefill sequences in the expanded form this step (``mla_prefill.py``), or None: all
    # absorbed (no prefill, or none with ``expanded_min_query`` queries).
    expanded: Optional["ExpandedPrefill"] = None


@dataclass
class ExpandedPrefill:
    """Sequences ``num_decodes ..`` of the step, decompressed and attended as multi-head
    attention; their queries are the step's rows ``num_decode_tokens ..``."""

    num_decode_tokens: int  # rows of q before the first expanded query
    max_query_len: int
    cu_q: torch.Tensor  # int32 [P + 1]: query starts, relative to num_decode_tokens
    cu_k: torch.Tensor  # int32 [P + 1]: key starts in the flat context list
    context_slots: torch.Tensor  # int64 [K]: each sequence's keys' cache slots, in order


class TritonMLAAttentionKernel:
    """``AttentionKernel`` for MLA specs on this module's kernels (cuda, rocm)."""

    name = "triton-mla"
    supports_mla = True
    supports_sliding_window = False
    supports_graph_capture = True  # no host sync; the grid depends on host ints of the batch
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3")  # fp8: e4m3 latent rows, one scale
    block_h = 16  # query heads a program: tl.dot wants at least 16 rows
    table_width_multiple = 16  # eager block tables: one stride class (paged.py's reason)
    block_n = 32  # keys a tile
    # Decode splits: enough programs (sequences x head blocks x splits) to fill the GPU
    # (132 SMs on an H100, 2 programs each), each split at least ``min_partition`` keys.
    target_programs = 264
    min_partition = 256
    max_splits = 32
    # A step whose prefill chunks reach this many queries runs them in the expanded form
    # (``mla_prefill.py``: decompressing a key costs what ~170 absorbed queries save on it).
    # The model asks ``expanded_prefill`` and does the decompression (``kv_b_proj``).
    expanded_min_query = 128
    # ... and when their contexts' decompressed keys and values (K keys x H heads x (n + v),
    # a transient the start-up memory profile saw only for K up to the token budget) stay
    # within K x H <= this (512 MiB at n + v = 256 in bf16); longer contexts stay absorbed.
    # (vLLM instead walks long contexts in pieces, merging by log-sum-exp: not done here.)
    expanded_max_key_heads = 1 << 20

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
        self.kv_cache_torch_dtype = (torch.float8_e4m3fn if spec.kv_cache_dtype != "auto"
                                     else None)
        self.k_scale = 1.0  # fp8 rows hold row / k_scale (one scale for the cache)

    def num_splits(self, num_decodes: int) -> int:
        """Decode splits for ``num_decodes`` sequences: a power of two, at most ``max_splits``
        and the longest context (``max_model_len``) in ``min_partition`` parts."""
        longest = self.spec.max_model_len or self.min_partition
        cap = min(self.max_splits, _p2(triton.cdiv(longest, self.min_partition)))
        programs = max(1, num_decodes * triton.cdiv(self.spec.num_heads, self.block_h))
        return max(1, min(cap, _p2(triton.cdiv(self.target_programs, programs))))

    def build_metadata(self, batch) -> TritonMLAMetadata:
        return TritonMLAMetadata(batch.num_seqs, batch.num_decodes,
                                 self.num_splits(batch.num_decodes), batch.max_query_len,
                                 batch.query_start_loc, batch.seq_lens, batch.block_tables,
                                 batch.slot_mapping, self._expanded(batch))

    def _expanded(self, batch) -> Optional[ExpandedPrefill]:
        """The step's prefill sequences in the expanded form, when one has at least
        ``expanded_min_query`` queries (eager steps only: graph steps are all decodes)::

            seq_lens_host[nd:] = [5, 3]   block_size 4, tables [[7, 2], [9]]
            context_slots = [28 29 30 31 8 | 36 37 38]    cu_k = [0, 5, 8]
        """
        nd, starts = batch.num_decodes, batch.query_start_loc_host
        if batch.num_seqs == nd or not starts or batch.max_query_len < self.expanded_min_query:
            return None
        if sum(batch.seq_lens_host[nd:]) * self.spec.num_heads > self.expanded_max_key_heads:
            return None
        lens = torch.tensor(batch.seq_lens_host[nd:], dtype=torch.int64)
        cu_k = torch.zeros(len(lens) + 1, dtype=torch.int64)
        torch.cumsum(lens, 0, out=cu_k[1:])
        seq = torch.repeat_interleave(torch.arange(len(lens)), lens)
        pos = torch.arange(int(cu_k[-1])) - cu_k[:-1].repeat_interleave(lens)
        device, bs = batch.block_tables.device, self.spec.block_size
        seq, pos = seq.to(device), pos.to(device)
        blocks = batch.block_tables[nd:][seq, pos // bs].long()
        cu_q = torch.tensor(starts[nd:], dtype=torch.int32) - starts[nd]
        return ExpandedPrefill(starts[nd], batch.max_query_len, cu_q.to(device),
                               cu_k.to(torch.int32).to(device), blocks * bs + pos % bs)

    def context_rows(self, k_cache: torch.Tensor, metadata: TritonMLAMetadata,
                     dtype: torch.dtype) -> torch.Tensor:
        """The expanded sequences' cached rows (this step's written by ``forward``), ``[K, D]``
        in ``dtype`` (fp8: times ``k_scale``), for the model to decompress."""
        flat = k_cache.view(-1, k_cache.shape[-1])
        if not _is_fp8(k_cache):
            return flat.index_select(0, metadata.expanded.context_slots).to(dtype)
        # The bytes gathered (index_select has no float8 kernel everywhere), then widened.
        rows = flat.view(torch.uint8).index_select(0, metadata.expanded.context_slots)
        return (rows.view(k_cache.dtype).to(torch.float32) * self.k_scale).to(dtype)

    def forward_expanded(self, q, k_nope, k_pe, v, metadata: TritonMLAMetadata, scale):
        """``mla_prefill.mla_prefill_expanded`` over the step's expanded sequences: ``q``
        ``[T_p, H, n + r]`` their queries, keys and values from ``context_rows``."""
        ex = metadata.expanded
        return mla_prefill_expanded(q, k_nope, k_pe, v, ex.cu_q, ex.cu_k, ex.max_query_len,
                                    scale)

    def forward(self, q, k, v, k_cache, v_cache, metadata: TritonMLAMetadata, scale):
        """Writes every row of ``k``; attends the rows of ``q``: every query (absorbed), or
        only the decodes' (``q`` of ``num_decodes`` rows: the model runs the rest through
        ``context_rows`` and ``forward_expanded``)."""
        md = metadata
        t, h, d = k.shape[0], q.shape[1], q.shape[2]
        out = torch.empty(q.shape[0], h, self.value_size, dtype=q.dtype, device=q.device)
        if t == 0:
            return out
        write_latent_rows(k.reshape(t, d), k_cache, md.slot_mapping, self.k_scale)
        fp8 = _is_fp8(k_cache)
        scale_log2 = scale * _LOG2E * (self.k_scale if fp8 else 1.0)
        v_factor = self.k_scale if fp8 else 1.0
        if md.num_decodes:
            mla_decode(q, k_cache, out, md.seq_lens, md.block_tables, scale_log2, v_factor,
                       num_decodes=md.num_decodes, num_splits=md.num_splits,
                       value_size=self.value_size, block_h=self.block_h, block_n=self.block_n,
                       dot_precision=_dot_precision(q.dtype),
                       widen=q.dtype == torch.float32 or _dot_fp32(q))
        if md.num_seqs > md.num_decodes and q.shape[0] > md.num_decodes:  # not expanded
            mla_chunks(q, k_cache, out, md.query_start_loc, md.seq_lens, md.block_tables,
                       scale_log2, v_factor, seq_offset=md.num_decodes,
                       num_seqs=md.num_seqs - md.num_decodes, max_query_len=md.max_query_len,
                       value_size=self.value_size, block_h=self.block_h, block_n=self.block_n)
        return out


def write_latent_rows(k: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor,
                      k_scale: float = 1.0) -> None:
    """Rows ``k`` ``[T, D]`` into their slots of ``cache`` (fp8: ``row / k_scale``)."""
    t, d = k.shape
    _mla_cache_kernel[(t,)](k, cache, slot_mapping, k.stride(0), cache.stride(0),
                            cache.stride(1), 1.0 / k_scale, D=d, D_P2=_p2(d),
                            BLOCK_SIZE=cache.shape[1], FP8=_is_fp8(cache),
                            FP8_MAX=_fp8_max(cache))


def mla_chunks(q, cache, out, query_start_loc, seq_lens, block_tables, scale_log2: float,
               v_factor: float, *, seq_offset: int, num_seqs: int, max_query_len: int,
               value_size: int, block_h: int = 16, block_n: int = 32) -> None:
    """Sequences ``seq_offset .. seq_offset + num_seqs - 1`` (any query count each) over their
    cached rows, into their rows of ``out``. Also the one-pass decode of before ``mla_decode``
    (``benchmarks/kernels/bench_mla.py`` times both)."""
    h = q.shape[1]
    dv_p2, dr = _p2(value_size), q.shape[2] - value_size
    # Rows a program: BLOCK_Q queries x BLOCK_H heads, its accumulator [rows, DV_P2] float32
    # in registers; at the released models' 512 one query a program.
    block_q = 1 if dv_p2 * block_h > 4096 else min(_p2(max_query_len), 4)
    grid = (num_seqs, triton.cdiv(max_query_len, block_q), triton.cdiv(h, block_h))
    _mla_kernel[grid](
        q, cache, out, query_start_loc, seq_lens, block_tables, seq_offset, scale_log2,
        v_factor, h, q.stride(0), q.stride(1), out.stride(0), out.stride(1), cache.stride(0),
        cache.stride(1), block_tables.stride(0), DV=value_size, DV_P2=dv_p2, DR=dr,
        DR_P2=max(16, _p2(dr)), BLOCK_Q=block_q, BLOCK_H=block_h, BLOCK_N=block_n,
        BLOCK_SIZE=cache.shape[1], DOT_PREC=_dot_precision(q.dtype), DOT_FP32=_dot_fp32(q),
        num_warps=8 if dv_p2 > 128 else 4)
