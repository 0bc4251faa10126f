"""Multi-head latent attention (``AttentionSpec.mla_value_size``, DeepSeek-V2/V3) on the cpu
backend: one latent row per token, keys = the whole row, values = its first ``Dv`` dims::

    k_cache row:  [ c_kv (Dv) | k_pe ]        written once per token (no value cache)
    out = softmax(scale * q . rows) @ rows[:, :Dv]      ->  [T, H, Dv]

The cpu kernel's metadata (``attention.py``: decode groups of similar length, batched short
queries, captured decode and verify steps, one SDPA per long prefill) is reused as it is; every
path gathers each sequence's rows once and hands SDPA the rows as keys and a ``[..., :Dv]`` view
of the same gathered rows as values, so the value product runs over ``Dv`` (512 of the released
models' 576) and nothing is copied for the values. The C decode kernel (``csrc/paged_decode.c``)
is not used: it takes keys and values of one width, and its head-size bound (256) is below
every released MLA row anyway, so tiny test models and real ones run the same code.

fp8 latent rows (``kv_cache_dtype='fp8'``): float8 e4m3 rows of ``row / k_scale`` (one scale
for the cache, ``reference/mla_attention.py``); a step dequantizes only the rows it gathers.
"""

from __future__ import annotations

import torch

from tessellm.backends.cpu.attention import (CpuAttentionKernel, CpuAttentionMetadata,
                                             DecodeGroup, _gather, _prefill_seqs,
                                             write_rows_padded)
from tessellm.backends.cpu.sdpa import sdpa
from tessellm.backends.reference.mla_attention import (FP8_DTYPES, dequantize_latent,
                                                       quantize_latent)


class CpuMLAAttentionKernel(CpuAttentionKernel):
    name = "cpu-sdpa-mla"
    supports_mla = True
    supports_sliding_window = False
    kv_cache_dtypes = ("auto", "fp8", "fp8_e4m3")

    def __init__(self, spec):
        if spec.num_kv_heads != 1:
            raise ValueError(f"MLA caches one latent row per token (num_kv_heads 1), got "
                             f"{spec.num_kv_heads}.")
        if spec.kv_cache_dtype not in self.kv_cache_dtypes:
            raise ValueError(f"cpu MLA attention supports kv_cache_dtype "
                             f"{', '.join(self.kv_cache_dtypes)}; got {spec.kv_cache_dtype!r}.")
        super().__init__(spec)
        self.native = None  # the torch paths at every shape (module docstring)
        self.value_size = spec.mla_value_size
        fp8 = spec.kv_cache_dtype != "auto"
        self.kv_cache_torch_dtype = torch.float8_e4m3fn if fp8 else None
        self.k_scale = 1.0  # the fp8 cache's per-tensor scale (rows stored as k / k_scale)

    def forward(self, q, k, v, k_cache, v_cache, metadata: CpuAttentionMetadata, scale):
        batch = metadata.batch
        self._write(k, k_cache, batch.slot_mapping, metadata.padded_slots)
        if metadata.verify_q:
            return self._batched(q, k_cache, metadata.verify_blocks, metadata.verify_mask,
                                 metadata.verify_q, scale)
        out = q.new_empty(q.shape[0], q.shape[1], self.value_size)
        nd = batch.num_decodes
        for group in metadata.decode_groups:
            rows = slice(None, nd) if group.rows is None else group.rows
            o = self._decode(q[rows], k_cache, group, scale)
            if group.rows is None:
                out[:nd] = o
            else:
                out.index_copy_(0, group.rows, o)
        starts = batch.query_start_loc_host
        if metadata.short is not None:
            short = metadata.short
            qs = q[starts[nd]:]
            if short.rows is not None:
                qs = qs.index_select(0, short.rows)
            o = self._batched(qs, k_cache, short.blocks, short.mask, short.n, scale)
            out[starts[nd]:] = o if short.keep is None else o.index_select(0, short.keep)
            return out
        for i, s in enumerate(_prefill_seqs(batch)):
            q0, q1 = starts[s], starts[s + 1]
            out[q0:q1] = self._prefill(q[q0:q1], k_cache, batch.block_tables[s],
                                       batch.seq_lens_host[s], metadata.prefill_masks[i], scale)
        return out

    def _write(self, k, k_cache, slot_mapping, padded: bool):
        """This step's rows into their slots, once (fp8: quantized; slots of -1: nothing)."""
        new, cache = quantize_latent(k, k_cache.dtype, self.k_scale), k_cache
        if cache.dtype in FP8_DTYPES:  # index_copy_ has no float8 kernel: copy the bytes
            new, cache = new.view(torch.uint8), cache.view(torch.uint8)
        if padded:
            write_rows_padded(new, cache, slot_mapping)
        else:
            cache.view(-1, *cache.shape[2:]).index_copy_(0, slot_mapping, new)

    def _rows(self, k_cache, blocks, dtype) -> torch.Tensor:
        """The rows of ``blocks`` (int64 ``[..., n]``), ``[..., n * block_size, D]`` in
        ``dtype``."""
        rows = _gather(k_cache, blocks)
        rows = rows.view(*blocks.shape[:-1], -1, k_cache.shape[-1])
        return dequantize_latent(rows, dtype, self.k_scale)

    def _attend(self, q, rows, mask, scale, is_causal=False):
        """``q`` ``[B, H', Q, D]`` over ``rows`` ``[B, 1, L, D]`` (keys; values the first
        ``Dv`` dims, a view): ``[B, H', Q, Dv]``. Expanded over H' as views: torch's CPU flash
        kernel takes 4-D inputs of one head count (``attention.CpuAttentionKernel._prefill``)."""
        b, h, _, d = q.shape
        keys = rows.expand(b, h, rows.shape[2], d)
        return sdpa(q, keys, keys[..., :self.value_size], attn_mask=mask, is_causal=is_causal,
                    scale=scale)

    def _decode(self, q, k_cache, dg: DecodeGroup, scale):
        """One query per sequence: the heads are the query rows of one KV group."""
        n, h, d = q.shape
        rows = self._rows(k_cache, dg.blocks, q.dtype)[:, None]  # [n, 1, L, D]
        return self._attend(q.view(n, 1, h, d), rows, dg.mask, scale).view(n, h, -1)

    def _batched(self, q, k_cache, blocks, mask, n: int, scale):
        """``q`` ``[S * n, H, D]``, n queries per sequence; ``mask`` ``[S, 1, n, L]``."""
        s, h, d = blocks.shape[0], q.shape[1], q.shape[2]
        rows = self._rows(k_cache, blocks, q.dtype)[:, None]  # [S, 1, L, D]
        o = self._attend(q.view(s, n, h, d).transpose(1, 2), rows, mask, scale)
        return o.transpose(1, 2).reshape(s * n, h, -1)

    def _prefill(self, q, k_cache, block_table, seq_len, mask, scale):
        nblocks = -(-seq_len // k_cache.shape[1])
        rows = self._rows(k_cache, block_table[:nblocks].long(), q.dtype)[:seq_len]
        o = self._attend(q.transpose(0, 1)[None], rows[None, None], mask, scale,
                         is_causal=mask is None)
        return o[0].transpose(0, 1)
