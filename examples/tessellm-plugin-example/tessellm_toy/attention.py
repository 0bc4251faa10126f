"""The toy backend's paged attention: block-streaming online softmax in plain torch.

Not the cpu backend's SDPA: every query token walks the KV blocks of its sequence one block
index at a time, all tokens together, keeping a running max ``m``, sum ``l`` and accumulator
``acc`` (the flash-attention recurrence)::

    for j in 0 .. num_blocks-1:             keys j*bs .. j*bs+bs-1 of each token's sequence
        s   = q . k_j * scale, masked where key_pos > pos (or outside the window)
        m'  = max(m, max(s));  p = exp(s - m')
        l   = l * exp(m - m') + sum(p);  acc = acc * exp(m - m') + p @ v_j;  m = m'
    out = acc / l

Attention sinks (plugin API 5, gpt-oss): a spec with ``attention_sinks`` gets each layer's
``sinks`` (a logit per query head) with every ``forward``; after the last block each row's
sink joins the recurrence once, as a key with no value: ``m' = max(m, sink)``, ``l = l *
exp(m - m') + exp(sink - m')``, ``acc = acc * exp(m - m')``.

Metadata comes from device tensors only (``seq_lens``, ``query_start_loc``) plus one host int,
an upper bound on blocks per sequence, so a captured step stays correct on replay.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ToyMetadata:
    tok_seq: torch.Tensor  # int64 [T]: the sequence of each query token
    tok_pos: torch.Tensor  # int64 [T]: its absolute position
    block_tables: torch.Tensor  # int64 [S, max_blocks]
    slot_mapping: torch.Tensor  # int64 [T]; -1 = do not write
    num_blocks: int  # blocks to walk: cdiv(max_seq_len, block_size), an upper bound


class ToyAttentionKernel:
    name = "toy-online-softmax"
    supports_sliding_window = True
    supports_attention_sinks = True  # forward's ``sinks`` (module docstring)
    supports_graph_capture = True

    def __init__(self, spec):
        if spec.num_heads % spec.num_kv_heads:
            raise ValueError(f"toy attention needs num_heads ({spec.num_heads}) to be a multiple "
                             f"of num_kv_heads ({spec.num_kv_heads}).")
        if spec.kv_cache_dtype != "auto":
            raise NotImplementedError("toy attention stores the KV cache in the model dtype only.")
        self.spec = spec

    def build_metadata(self, batch) -> ToyMetadata:
        qsl = batch.query_start_loc.long()
        t = torch.arange(batch.num_tokens, device=qsl.device)
        tok_seq = torch.searchsorted(qsl[1:], t, right=True)
        q_end = qsl[tok_seq + 1]
        tok_pos = batch.seq_lens.long()[tok_seq] - (q_end - t)
        bs = self.spec.block_size
        return ToyMetadata(tok_seq, tok_pos, batch.block_tables.long(), batch.slot_mapping.long(),
                           min(-(-batch.max_seq_len // bs), batch.block_tables.shape[1]))

    def forward(self, q, k, v, k_cache, v_cache, metadata: ToyMetadata, scale: float, *,
                sinks=None):
        md = metadata
        _write(k, v, k_cache, v_cache, md.slot_mapping)
        T, H, D = q.shape
        kvh, bs = k_cache.shape[2], k_cache.shape[1]
        qg = q.float().view(T, kvh, H // kvh, D) * scale
        m = torch.full((T, kvh, H // kvh), float("-inf"), device=q.device)
        l = torch.zeros_like(m)
        acc = torch.zeros(T, kvh, H // kvh, D, device=q.device)
        window = self.spec.sliding_window
        offsets = torch.arange(bs, device=q.device)
        for j in range(md.num_blocks):
            blocks = md.block_tables[md.tok_seq, j]  # [T]
            kj = k_cache[blocks].float()  # [T, bs, KVH, D]
            vj = v_cache[blocks].float()
            s = torch.einsum("tkgd,tbkd->tkgb", qg, kj)
            key_pos = j * bs + offsets  # [bs]
            ok = key_pos[None, :] <= md.tok_pos[:, None]  # [T, bs]
            if window is not None:
                ok &= key_pos[None, :] > md.tok_pos[:, None] - window
            s = s.masked_fill(~ok[:, None, None, :], float("-inf"))
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = torch.where(torch.isinf(m_new), torch.zeros_like(m_new), m_new)
            p = torch.exp(s - m_safe[..., None])
            alpha = torch.exp(m - m_safe)
            l = l * alpha + p.sum(-1)
            acc = acc * alpha[..., None] + torch.einsum("tkgb,tbkd->tkgd", p, vj)
            m = m_new
        if sinks is not None:  # one more key per row, with no value
            sink = sinks.float().view(1, kvh, H // kvh).expand_as(m)
            m_new = torch.maximum(m, sink)
            alpha = torch.exp(m - m_new)
            l = l * alpha + torch.exp(sink - m_new)
            acc = acc * alpha[..., None]
        out = acc / torch.where(l > 0, l, torch.ones_like(l))[..., None]
        return out.reshape(T, H, D).to(q.dtype)


def _write(k, v, k_cache, v_cache, slot_mapping) -> None:
    bs = k_cache.shape[1]
    keep = slot_mapping >= 0
    slots = slot_mapping[keep]
    k_cache[slots // bs, slots % bs] = k[keep].to(k_cache.dtype)
    v_cache[slots // bs, slots % bs] = v[keep].to(v_cache.dtype)
