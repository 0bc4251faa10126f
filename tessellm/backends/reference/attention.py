"""Reference paged attention: obviously-correct pure torch, one sequence at a time.

This is the oracle every attention kernel is tested against. It favours clarity over speed:
it gathers each sequence's keys and values through its block table and runs dense causal
attention in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


def write_kv_cache(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter ``k``/``v`` ``[T, KVH, D]`` into the caches ``[num_blocks, block_size, KVH, D]``.

    Slots of -1 are skipped (padding tokens).
    """
    block_size = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    blocks, offsets = slots // block_size, slots % block_size
    k_cache[blocks, offsets] = k[keep].to(k_cache.dtype)
    v_cache[blocks, offsets] = v[keep].to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, block_table: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The first ``seq_len`` tokens of one sequence from a paged cache: ``[seq_len, KVH, D]``."""
    block_size = cache.shape[1]
    num_blocks = (seq_len + block_size - 1) // block_size
    blocks = cache[block_table[:num_blocks].long()]  # [nb, bs, KVH, D]
    return blocks.reshape(-1, *cache.shape[2:])[:seq_len]


def causal_mask(query_len: int, seq_len: int, sliding_window: Optional[int], device,
                key_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Boolean ``[query_len, seq_len]``: True where query i may attend key j.

    Query i sits at absolute position ``seq_len - query_len + i`` and sees keys up to it, or up
    to ``key_limits[i]`` when given (``AttentionBatch.key_limits``: >= its position); the
    sliding window stays relative to its position.
    """
    q_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    k_pos = torch.arange(seq_len, device=device)[None, :]
    limit = q_pos if key_limits is None else key_limits.to(device).long()[:, None]
    mask = k_pos <= limit
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


def softcap(scores: torch.Tensor, cap: Optional[float]) -> torch.Tensor:
    """Attention logit soft-capping (``AttentionSpec.logit_softcap``): ``cap * tanh(s / cap)``,
    applied to the scaled scores before the mask and softmax; None: unchanged."""
    return scores if cap is None else cap * torch.tanh(scores / cap)


def softmax_with_sinks(scores: torch.Tensor, sinks: Optional[torch.Tensor]) -> torch.Tensor:
    """Softmax over the last dim of masked ``scores``, with attention sinks
    (``AttentionSpec.attention_sinks``, gpt-oss): each row's denominator also holds
    ``exp(sink)``, a logit of a key with no value, so the probabilities sum to less than 1.
    ``sinks`` broadcasts to ``scores.shape[:-1] + (1,)`` (one per query head); None: plain
    softmax. The sink is not scaled or soft-capped. A row that sees no key gives zeros."""
    if sinks is None:
        return torch.softmax(scores, dim=-1)
    sink = sinks.float().expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores.float(), sink], dim=-1), dim=-1)[..., :-1]


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                    query_start_loc: torch.Tensor, seq_lens: torch.Tensor,
                    block_tables: torch.Tensor, scale: float,
                    sliding_window: Optional[int] = None,
                    logit_softcap: Optional[float] = None,
                    sinks: Optional[torch.Tensor] = None,
                    key_limits: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of flat queries ``q`` ``[T, H, D]`` over paged K/V. Returns ``[T, H, D]``.

    The new tokens' K/V must already be in the cache (see ``write_kv_cache``). Scores are
    ``softcap(scale * q.k, logit_softcap)``, then masked and softmaxed; ``sinks`` ``[H]``
    (attention sinks) join each head's softmax denominator (``softmax_with_sinks``).
    ``key_limits`` ``[T]``: the last key each row sees (``AttentionBatch.key_limits``);
    None: causal.
    """
    num_heads = q.shape[1]
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    out = torch.empty_like(q)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    for s, seq_len in enumerate(lens):
        q0, q1 = starts[s], starts[s + 1]
        if q1 == q0:
            continue
        k = gather_kv(k_cache, block_tables[s], seq_len).float()
        v = gather_kv(v_cache, block_tables[s], seq_len).float()
        k = k.repeat_interleave(group, dim=1)  # [L, H, D]
        v = v.repeat_interleave(group, dim=1)
        qs = q[q0:q1].float()  # [Q, H, D]
        scores = softcap(torch.einsum("qhd,khd->hqk", qs, k) * scale, logit_softcap)
        mask = causal_mask(q1 - q0, seq_len, sliding_window, q.device,
                           None if key_limits is None else key_limits[q0:q1])
        scores = scores.masked_fill(~mask, -math.inf)
        probs = softmax_with_sinks(scores, None if sinks is None else sinks.view(-1, 1, 1))
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v).to(q.dtype)
    return out


class ReferenceAttentionKernel:
    """The reference ops wrapped as an ``AttentionKernel`` (for tests and as a fallback)."""

    name = "reference"
    supports_sliding_window = True
    supports_logit_softcap = True
    supports_attention_sinks = True
    supports_key_limits = True

    def __init__(self, sliding_window: Optional[int] = None, logit_softcap: Optional[float] = None):
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap

    def build_metadata(self, batch):
        return batch

    def forward(self, q, k, v, k_cache, v_cache, metadata, scale, *, sinks=None):
        write_kv_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        return paged_attention(q, k_cache, v_cache, metadata.query_start_loc, metadata.seq_lens,
                               metadata.block_tables, scale, self.sliding_window,
                               self.logit_softcap, sinks, getattr(metadata, "key_limits", None))
