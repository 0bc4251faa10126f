"""Chunked local attention (Llama 4's rope layers, ``attention_chunk_size``) on any backend's
paged attention kernel, without a kernel change.

Invariant: a query at absolute position ``p`` attends the keys at positions ``k <= p`` with
``k // C == p // C`` (``C`` the chunk size): the keys of its own chunk, up to itself.

Each sequence's queries are cut at chunk boundaries and every piece goes to the kernel as a
sequence of its own, a *virtual sequence*, whose context starts at its chunk's first token: its
block table is the sequence's, shifted by whole blocks, and its length counts from the chunk
start. Hence ``C`` must be a multiple of the KV cache's ``block_size``::

    C = 8, block_size = 4; 6 tokens cached, 7 new ones (positions 6..12) this step

    positions    0 1 2 3 | 4 5 6 7 | 8 9 10 11 | 12
    blocks       b0      | b1      | b2        | b3
    chunks       chunk 0           | chunk 1
    virtual 0:   queries 6, 7        seq_len 8 (keys 0..7)    table [b0 b1 b2 b3]
    virtual 1:   queries 8..12       seq_len 5 (keys 8..12)   table [b2 b3 b3 b3]

Query rows keep their order and ``slot_mapping`` is unchanged (keys are written where they
always are); only ``query_start_loc``, ``seq_lens``, ``block_tables``, their host copies and the
counts and maxima change. A decode stays one sequence, so the first ``num_decodes`` virtual
sequences are still exactly the decodes (``AttentionBatch``'s ordering). Table entries past a
virtual sequence's blocks repeat the last real column: real block ids the kernel masks off by
``seq_lens`` (the contract's rule for unused entries).
"""

from __future__ import annotations

import dataclasses

import torch


class ChunkedLocalKernel:
    """Wraps an ``AttentionKernel`` (``backends/spec.py``) built for full causal attention: its
    ``build_metadata`` sees the virtual sequences (module docstring), its ``forward`` runs as
    it is. Capabilities are the wrapped kernel's."""

    supports_sliding_window = False

    def __init__(self, kernel, chunk_size: int, block_size: int):
        if chunk_size <= 0 or chunk_size % block_size:
            raise ValueError(f"attention_chunk_size {chunk_size} is not a positive multiple of "
                             f"the KV cache block_size {block_size}: chunked local attention "
                             "starts each chunk at a block boundary. Use a block_size that "
                             f"divides {chunk_size}.")
        self.kernel, self.chunk_size, self.block_size = kernel, chunk_size, block_size
        self.name = f"{getattr(kernel, 'name', type(kernel).__name__)}+chunked({chunk_size})"
        for flag in ("fuses_rotary", "supports_graph_capture"):
            setattr(self, flag, bool(getattr(kernel, flag, False)))

    def build_metadata(self, batch):
        return self.kernel.build_metadata(local_batch(batch, self.chunk_size, self.block_size))

    def forward(self, *args, **kwargs):
        return self.kernel.forward(*args, **kwargs)


def local_batch(batch, chunk: int, block_size: int):
    """``batch`` (an ``AttentionBatch``) as virtual sequences, one per (sequence, chunk) its
    queries touch; ``batch`` itself when no sequence reaches past its first chunk."""
    if getattr(batch, "key_limits", None) is not None:  # absolute positions: not shifted here
        raise ValueError("Chunked local attention (attention_chunk_size) does not combine with "
                         "prefill key limits (AttentionBatch.key_limits) in one layer: a model "
                         "declares one or the other per attention layer (its AttentionSpec's "
                         "prefill_key_limits off where the layer is chunked).")
    if not batch.seq_lens_host:  # a graph-captured step: host lists are empty
        if batch.num_decodes != batch.num_seqs:
            raise ValueError("Chunked local attention (attention_chunk_size) cannot split the "
                             "queries of a captured multi-token step (speculative decoding's "
                             "verify graphs); run with enforce_eager=True or without "
                             "speculative decoding.")
        return _local_decodes(batch, chunk, block_size)
    starts, lens = batch.query_start_loc_host, batch.seq_lens_host
    if max(lens, default=0) <= chunk:
        return batch
    q_starts, seq_lens, rows, first_blocks = [0], [], [], []
    for s in range(batch.num_seqs):
        end_pos = lens[s]
        pos = end_pos - (starts[s + 1] - starts[s])  # the first query's position
        while True:
            chunk_start = pos // chunk * chunk
            stop = min(end_pos, chunk_start + chunk)
            q_starts.append(q_starts[-1] + stop - pos)
            seq_lens.append(stop - chunk_start)
            rows.append(s)
            first_blocks.append(chunk_start // block_size)
            pos = stop
            if pos >= end_pos:
                break
    device = batch.seq_lens.device
    width = max(-(-n // block_size) for n in seq_lens)
    cols = torch.tensor(first_blocks)[:, None] + torch.arange(width)[None, :]
    cols = cols.clamp_(max=batch.block_tables.shape[1] - 1).to(device)
    tables = batch.block_tables[torch.tensor(rows, device=device)].gather(1, cols)
    q_lens = [b - a for a, b in zip(q_starts, q_starts[1:])]
    return dataclasses.replace(
        batch, num_seqs=len(seq_lens),
        query_start_loc=torch.tensor(q_starts, dtype=batch.query_start_loc.dtype, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=batch.seq_lens.dtype, device=device),
        block_tables=tables.contiguous(), max_query_len=max(q_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=q_starts, seq_lens_host=seq_lens)


def _local_decodes(batch, chunk: int, block_size: int):
    """Every sequence a decode (a captured step): device tensors only, no host reads, so the
    arithmetic is captured with the graph and replays with each step's ``seq_lens``."""
    lens = batch.seq_lens
    chunk_start = (lens - 1).clamp(min=0) // chunk * chunk
    local = torch.where(lens > 0, lens - chunk_start, lens)
    table = batch.block_tables
    cols = (chunk_start // block_size).long()[:, None] + torch.arange(
        table.shape[1], device=table.device)[None, :]
    tables = table.gather(1, cols.clamp_(max=table.shape[1] - 1))
    return dataclasses.replace(batch, seq_lens=local.to(lens.dtype), block_tables=tables,
                               max_seq_len=min(batch.max_seq_len, chunk))
