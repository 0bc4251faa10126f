"""Reference multi-head latent attention (MLA, DeepSeek-V2/V3) over a paged latent cache: the
oracle of a kernel that declares ``supports_mla`` (``AttentionSpec.mla_value_size``).

In the absorbed form MLA is multi-query attention with one KV "head" whose row is the token's
latent, and whose value is the leading part of that same row::

    cache row (D = kv_lora_rank + qk_rope_head_dim):   [ c_kv (Dv)      | k_pe ]
    q row per head:                                    [ q_nope @ W_UK  | q_pe ]
    score = scale * q . row          value = row[:Dv] = c_kv      out: [T, H, Dv]

so only ``k_cache`` exists (``[num_blocks, block_size, 1, D]``); there is no value cache.

fp8 latent rows (``kv_cache_dtype='fp8'``): the cache is float8 e4m3 and holds
``row / k_scale`` saturated at +-448, with one float ``k_scale`` for the whole cache (per
tensor, as the other fp8 KV caches); a row reads back as ``fp8 * k_scale``. The value, being
the same row, shares the scale.
"""

from __future__ import annotations

import math

import torch

from tessellm.backends.reference.attention import causal_mask, gather_kv

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


def quantize_latent(k: torch.Tensor, cache_dtype: torch.dtype, k_scale: float = 1.0) -> torch.Tensor:
    """Rows as the cache stores them: ``k / k_scale`` saturated to e4m3 for an fp8 cache, else
    ``k`` in the cache's dtype."""
    if cache_dtype not in FP8_DTYPES:
        return k.to(cache_dtype)
    fp8_max = torch.finfo(cache_dtype).max
    return (k.float() / k_scale).clamp(-fp8_max, fp8_max).to(cache_dtype)


def dequantize_latent(rows: torch.Tensor, dtype: torch.dtype, k_scale: float = 1.0) -> torch.Tensor:
    """Cached rows read back in ``dtype``: ``fp8 * k_scale`` for an fp8 cache."""
    if rows.dtype not in FP8_DTYPES:
        return rows.to(dtype)
    return (rows.float() * k_scale).to(dtype)


def write_latent_cache(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor,
                       k_scale: float = 1.0) -> None:
    """Scatter the latent rows ``k`` ``[T, 1, D]`` into ``k_cache``; slots of -1 are skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = quantize_latent(k[keep], k_cache.dtype,
                                                                       k_scale)


def paged_mla_attention(q: torch.Tensor, k_cache: torch.Tensor, value_size: int,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float,
                        k_scale: float = 1.0) -> torch.Tensor:
    """Flat queries ``q`` ``[T, H, D]`` over each sequence's cached latent rows (this step's
    written already): ``[T, H, value_size]`` in q's dtype, computed in float32."""
    t, h, _ = q.shape
    out = torch.empty(t, h, value_size, dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        rows = dequantize_latent(gather_kv(k_cache, block_tables[s], seq_len)[:, 0],
                                 torch.float32, k_scale)  # [L, D]
        scores = torch.einsum("qhd,kd->hqk", q[q0:q1].float(), rows) * scale
        mask = causal_mask(q1 - q0, seq_len, None, q.device)
        probs = torch.softmax(scores.masked_fill(~mask, -math.inf), dim=-1)
        out[q0:q1] = torch.einsum("hqk,kd->qhd", probs, rows[:, :value_size]).to(q.dtype)
    return out


class ReferenceMLAAttentionKernel:
    """The reference ops as an MLA ``AttentionKernel`` (tests, and a fallback)."""

    name = "reference-mla"
    supports_sliding_window = False
    supports_mla = True

    def __init__(self, value_size: int, k_scale: float = 1.0):
        self.value_size = value_size
        self.k_scale = k_scale

    def build_metadata(self, batch):
        return batch

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
        write_latent_cache(k, k_cache, metadata.slot_mapping, self.k_scale)
        return paged_mla_attention(q, k_cache, self.value_size, metadata.query_start_loc,
                                   metadata.seq_lens, metadata.block_tables, scale, self.k_scale)
