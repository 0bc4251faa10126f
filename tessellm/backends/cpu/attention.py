"""Paged attention for the cpu backend, in plain torch.

Decode sequences (one query each, first in the batch) run as one batched SDPA over their
gathered, right-padded contexts; prefill chunks run one SDPA per sequence. K/V are always read
through the block table: the cache is paged, never a contiguous per-request buffer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from tessellm.backends.spec import AttentionSpec
from tessellm.core.attention_batch import AttentionBatch


@dataclass
class CpuAttentionMetadata:
    batch: AttentionBatch
    decode_mask: Optional[torch.Tensor]  # bool [num_decodes, 1, 1, L]: key j valid for seq s
    decode_blocks: Optional[torch.Tensor]  # int64 [num_decodes, blocks] block ids to gather
    prefill_masks: list[Optional[torch.Tensor]]  # per prefill seq: bool [Q, L] or None (causal)


class CpuAttentionKernel:
    name = "cpu-sdpa"
    supports_sliding_window = True

    def __init__(self, spec: AttentionSpec):
        self.spec = spec
        self.window = spec.sliding_window

    def build_metadata(self, batch: AttentionBatch) -> CpuAttentionMetadata:
        bs = self.spec.block_size
        nd = batch.num_decodes
        decode_mask = decode_blocks = None
        if nd:
            lens = batch.seq_lens[:nd].long()
            max_len = max(batch.seq_lens_host[:nd])
            nblocks = -(-max_len // bs)
            decode_blocks = batch.block_tables[:nd, :nblocks].long()
            k_pos = torch.arange(nblocks * bs)
            q_pos = (lens - 1)[:, None]
            valid = k_pos[None, :] <= q_pos
            if self.window is not None:
                valid &= k_pos[None, :] > q_pos - self.window
            decode_mask = valid[:, None, None, :]
        prefill_masks = []
        for s in range(nd, batch.num_seqs):
            q_len = batch.query_start_loc_host[s + 1] - batch.query_start_loc_host[s]
            seq_len = batch.seq_lens_host[s]
            if q_len == seq_len and self.window is None:
                prefill_masks.append(None)
                continue
            q_pos = torch.arange(seq_len - q_len, seq_len)[:, None]
            k_pos = torch.arange(seq_len)[None, :]
            mask = k_pos <= q_pos
            if self.window is not None:
                mask &= k_pos > q_pos - self.window
            prefill_masks.append(mask)
        return CpuAttentionMetadata(batch, decode_mask, decode_blocks, prefill_masks)

    def forward(self, q, k, v, k_cache, v_cache, metadata: CpuAttentionMetadata, scale: float):
        batch = metadata.batch
        _write_cache(k, v, k_cache, v_cache, batch.slot_mapping)
        out = torch.empty_like(q)
        nd = batch.num_decodes
        if nd:
            out[:nd] = self._decode(q[:nd], k_cache, v_cache, metadata, scale)
        starts = batch.query_start_loc_host
        for i, s in enumerate(range(nd, batch.num_seqs)):
            q0, q1 = starts[s], starts[s + 1]
            out[q0:q1] = self._prefill(q[q0:q1], k_cache, v_cache, batch.block_tables[s],
                                       batch.seq_lens_host[s], metadata.prefill_masks[i], scale)
        return out

    def _decode(self, q, k_cache, v_cache, md: CpuAttentionMetadata, scale):
        nd, num_heads, head_size = q.shape
        kvh = k_cache.shape[2]
        group = num_heads // kvh
        blocks = md.decode_blocks
        k = _gather(k_cache, blocks).view(nd, -1, kvh, head_size).transpose(1, 2)  # [B, KVH, L, D]
        v = _gather(v_cache, blocks).view(nd, -1, kvh, head_size).transpose(1, 2)
        qg = q.view(nd, kvh, group, head_size)  # the group's queries share a position
        o = F.scaled_dot_product_attention(qg, k, v, attn_mask=md.decode_mask, scale=scale)
        return o.reshape(nd, num_heads, head_size)

    def _prefill(self, q, k_cache, v_cache, block_table, seq_len, mask, scale):
        bs = k_cache.shape[1]
        nblocks = -(-seq_len // bs)
        ids = block_table[:nblocks].long()
        k = _gather(k_cache, ids).view(-1, *k_cache.shape[2:])[:seq_len].transpose(0, 1)  # [KVH, L, D]
        v = _gather(v_cache, ids).view(-1, *v_cache.shape[2:])[:seq_len].transpose(0, 1)
        qh = q.transpose(0, 1)  # [H, Q, D]
        o = F.scaled_dot_product_attention(qh, k, v, attn_mask=mask, is_causal=mask is None,
                                           scale=scale, enable_gqa=True)
        return o.transpose(0, 1)


def _gather(cache: torch.Tensor, block_ids: torch.Tensor) -> torch.Tensor:
    """Whole blocks by id, as ``[*block_ids.shape, block_size * KVH * D]``.

    index_select over a 2-D view copies contiguous rows; it is several times faster on the CPU
    than advanced indexing of the 4-D cache.
    """
    flat = cache.view(cache.shape[0], -1)
    return flat.index_select(0, block_ids.reshape(-1)).view(*block_ids.shape, -1)


def _write_cache(k, v, k_cache, v_cache, slot_mapping):
    kvh, d = k_cache.shape[2], k_cache.shape[3]
    k_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, kvh, d).index_copy_(0, slot_mapping, v.to(v_cache.dtype))
