"""Paged attention in plain torch, device-agnostic and shape-stable ("padded" formulation).

Used by the xpu backend when intel-extension-for-pytorch is absent, and by the tpu backend as
its XLA path (every shape below is a bucket, so XLA compiles it once per bucket). No host
sync in ``forward``; ``build_metadata`` does its index arithmetic on the host from the batch's
host lists, then copies once to the device.

Each sequence's queries are packed into a padded ``[S, Q]`` grid and its keys gathered
through its block table into ``[S, L]`` (L = blocks x block_size)::

    flat q rows:   | d0 | p1 p1 p1 | p2 p2 |          S = 3, Q = bucket(3), MB = bucket(blocks)
    q_rows[S, Q]:  [[0, 0, 0],                         row of q for (sequence, query i);
                    [1, 2, 3],                         padding repeats row 0 (masked out)
                    [4, 5, 0]]
    tok_seq[T], tok_q[T]:  where each flat row sits in the grid (to gather the output back)
    q_pos[S, Q] = seq_len - query_len + i;  key j of sequence s is visible to query i when
                  j <= q_pos and j < seq_len (and j > q_pos - window)
    q_lim[S, Q] = the key limit of that query (``AttentionBatch.key_limits``), when the step
                  has them: j <= q_lim replaces j <= q_pos
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch

from tessellm.backends.reference.attention import softcap, softmax_with_sinks


@dataclass
class PaddedMetadata:
    """Device tensors for one step; every shape is a bucket."""

    q_rows: torch.Tensor  # int64 [S, Q]: row of q for (sequence, query index); padding -> 0
    q_pos: torch.Tensor  # int64 [S, Q]: absolute position of that query; padding -> -1
    seq_lens: torch.Tensor  # int64 [S]: keys per sequence; padding sequences -> 0
    block_tables: torch.Tensor  # int64 [S, MB]: block ids; padding -> 0
    tok_seq: torch.Tensor  # int64 [T]: grid row of flat query row t
    tok_q: torch.Tensor  # int64 [T]: grid column of flat query row t
    slot_mapping: torch.Tensor  # int64 [T]: cache slot per new k/v; -1 = skip
    is_pure_decode: bool = False  # every sequence has exactly one query this step
    # int64 [S, Q]: the last key each query sees (``AttentionBatch.key_limits``); None: q_pos
    q_lim: Optional[torch.Tensor] = None


def pow2(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), minimum)
    return 1 << (n - 1).bit_length()


def identity_bucket(n: int) -> int:
    return n


class PaddedTorchAttentionKernel:
    """``AttentionKernel`` in plain torch over a padded per-sequence grid."""

    name = "torch-padded"
    supports_sliding_window = True
    supports_logit_softcap = True
    supports_attention_sinks = True
    supports_key_limits = True
    supports_graph_capture = False  # metadata shapes follow the batch

    def __init__(self, spec, bucket: Callable[[int], int] = identity_bucket):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"num_heads {spec.num_heads} is not a multiple of num_kv_heads "
                             f"{spec.num_kv_heads}.")
        if spec.kv_cache_dtype != "auto":
            raise NotImplementedError(f"{self.name} attention supports kv_cache_dtype='auto' "
                                      f"only, got {spec.kv_cache_dtype!r}.")
        self.spec = spec
        self.window = spec.sliding_window
        self.softcap = getattr(spec, "logit_softcap", None)
        self.bucket = bucket

    def build_metadata(self, batch) -> PaddedMetadata:
        bs = self.spec.block_size
        starts, lens = batch.query_start_loc_host, batch.seq_lens_host
        n_seqs = batch.num_seqs
        q_lens = [starts[s + 1] - starts[s] for s in range(n_seqs)]
        S, Q, MB = self.grid(batch, n_seqs, max(q_lens), -(-max(lens) // bs))
        q_rows = np.zeros((S, Q), dtype=np.int64)
        q_pos = np.full((S, Q), -1, dtype=np.int64)
        tok_seq = np.zeros(batch.num_tokens, dtype=np.int64)
        tok_q = np.zeros(batch.num_tokens, dtype=np.int64)
        limits = getattr(batch, "key_limits_host", None)
        # A spec with key limits always has q_lim (q_pos where the step has none): one program
        # per bucket under XLA, whatever the step holds.
        with_limits = limits is not None or getattr(self.spec, "prefill_key_limits", False)
        q_lim = np.full((S, Q), -1, dtype=np.int64) if with_limits else None
        for s in range(n_seqs):
            n, start = q_lens[s], starts[s]
            q_rows[s, :n] = np.arange(start, start + n)
            q_pos[s, :n] = np.arange(lens[s] - n, lens[s])
            tok_seq[start:start + n] = s
            tok_q[start:start + n] = np.arange(n)
            if q_lim is not None:
                q_lim[s, :n] = q_pos[s, :n] if limits is None else limits[start:start + n]
        seq_lens = np.zeros(S, dtype=np.int64)
        seq_lens[:n_seqs] = lens
        tables = batch.block_tables.long()
        width = min(MB, tables.shape[1])
        block_tables = torch.zeros((S, MB), dtype=torch.int64, device=tables.device)
        block_tables[:n_seqs, :width] = tables[:, :width]
        dev = batch.slot_mapping.device
        return PaddedMetadata(
            q_rows=torch.from_numpy(q_rows).to(dev), q_pos=torch.from_numpy(q_pos).to(dev),
            seq_lens=torch.from_numpy(seq_lens).to(dev), block_tables=block_tables,
            tok_seq=torch.from_numpy(tok_seq).to(dev), tok_q=torch.from_numpy(tok_q).to(dev),
            slot_mapping=batch.slot_mapping.long(),
            is_pure_decode=batch.num_decodes == batch.num_seqs,
            q_lim=None if q_lim is None else torch.from_numpy(q_lim).to(dev))

    def grid(self, batch, num_seqs: int, max_query_len: int, max_blocks: int) -> tuple[int, int, int]:
        """The padded grid: sequences S, queries per sequence Q, blocks per sequence MB."""
        return self.bucket(num_seqs), self.bucket(max_query_len), self.bucket(max_blocks)

    def forward(self, q, k, v, k_cache, v_cache, metadata: PaddedMetadata, scale: float, *,
                sinks=None):
        self.write_cache(k, v, k_cache, v_cache, metadata.slot_mapping)
        return padded_attention(q, k_cache, v_cache, metadata, scale, self.window, self.softcap,
                                sinks)

    def write_cache(self, k, v, k_cache, v_cache, slot_mapping) -> None:
        keep = slot_mapping >= 0
        slots = slot_mapping[keep]
        kvh, d = k_cache.shape[2], k_cache.shape[3]
        k_cache.view(-1, kvh, d).index_copy_(0, slots, k[keep].to(k_cache.dtype))
        v_cache.view(-1, kvh, d).index_copy_(0, slots, v[keep].to(v_cache.dtype))


def padded_attention(q, k_cache, v_cache, md: PaddedMetadata, scale: float,
                     window: Optional[int], logit_softcap: Optional[float] = None,
                     sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Attention of flat ``q`` ``[T, H, D]`` over the paged caches, in float32; returns
    ``[T, H, D]`` in q's dtype. Every shape is fixed by the metadata's buckets. Scores are
    soft-capped by ``logit_softcap`` (``reference.attention.softcap``) when set; ``sinks``
    ``[H]`` join each head's softmax denominator (``softmax_with_sinks``)."""
    S, Q = md.q_rows.shape
    MB = md.block_tables.shape[1]
    bs, kvh, d = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
    h = q.shape[1]
    g = h // kvh
    L = MB * bs
    qs = q[md.q_rows].float().view(S, Q, kvh, g, d)  # [S, Q, KVH, G, D]
    ks = k_cache[md.block_tables].view(S, L, kvh, d).float()  # [S, L, KVH, D]
    vs = v_cache[md.block_tables].view(S, L, kvh, d).float()
    scores = softcap(torch.einsum("sqkgd,slkd->skgql", qs, ks) * scale,
                     logit_softcap)  # [S, KVH, G, Q, L]
    key_pos = torch.arange(L, device=q.device)
    qp = md.q_pos[:, :, None]  # [S, Q, 1]
    limit = qp if md.q_lim is None else md.q_lim[:, :, None]
    visible = (key_pos[None, None, :] <= limit) & (key_pos[None, None, :] < md.seq_lens[:, None, None])
    if window is not None:
        visible &= key_pos[None, None, :] > qp - window
    visible = visible[:, None, None]  # [S, 1, 1, Q, L]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = softmax_with_sinks(scores, None if sinks is None else sinks.view(1, kvh, g, 1, 1))
    probs = torch.where(visible, probs, torch.zeros((), device=q.device))  # padding rows: 0
    out = torch.einsum("skgql,slkd->sqkgd", probs, vs).reshape(S, Q, h, d)
    return out[md.tok_seq, md.tok_q].to(q.dtype)
