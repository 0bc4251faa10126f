"""Reference multi-head latent attention (MLA, DeepSeek-V2/V3) over a paged latent cache: the
oracle of a kernel that declares ``supports_mla`` (``AttentionSpec.mla_value_size``).

In the absorbed form MLA is multi-query attention with one KV "head" whose row is the token's
latent, and whose value is the leading part of that same row::

    cache row (D = kv_lora_rank + qk_rope_head_dim):   [ c_kv (Dv)      | k_pe ]
    q row per head:                                    [ q_nope @ W_UK  | q_pe ]
    score = scale * q . row          value = row[:Dv] = c_kv      out: [T, H, Dv]

so only ``k_cache`` exists (``[num_blocks, block_size, 1, D]``); there is no value cache.
"""

from __future__ import annotations

import math

import torch

from tessellm.backends.reference.attention import causal_mask, gather_kv


def write_latent_cache(k: torch.Tensor, k_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Scatter the latent rows ``k`` ``[T, 1, D]`` into ``k_cache``; slots of -1 are skipped."""
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    k_cache[slots // block_size, slots % block_size] = k[keep].to(k_cache.dtype)


def paged_mla_attention(q: torch.Tensor, k_cache: torch.Tensor, value_size: int,
                        query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                        block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """Flat queries ``q`` ``[T, H, D]`` over each sequence's cached latent rows (this step's
    written already): ``[T, H, value_size]`` in q's dtype, computed in float32."""
    t, h, _ = q.shape
    out = torch.empty(t, h, value_size, dtype=q.dtype, device=q.device)
    starts = query_start_loc.tolist()
    for s, seq_len in enumerate(seq_lens.tolist()):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        rows = gather_kv(k_cache, block_tables[s], seq_len)[:, 0].float()  # [L, D]
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

    def __init__(self, value_size: int):
        self.value_size = value_size

    def build_metadata(self, batch):
        return batch

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
        write_latent_cache(k, k_cache, metadata.slot_mapping)
        return paged_mla_attention(q, k_cache, self.value_size, metadata.query_start_loc,
                                   metadata.seq_lens, metadata.block_tables, scale)
