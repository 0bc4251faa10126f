"""Flat attention batches for a drafter (draft model or EAGLE head) over the target's blocks.

A drafter's KV cache has the target's block ids: a request's slot for position ``p`` is
``block_ids[p // bs] * bs + p % bs`` in both caches (the drafter's own tensors, its own layer
count). A drafter step is a list of runs, one per request: consecutive positions
``start .. start + n - 1`` whose K/V it writes, attending to everything before them::

    run A  (prefill chunk)  start 0, n 5     positions 0 1 2 3 4       seq_len 5
    run B  (decode)         start 9, n 1     position  9               seq_len 10
    flat (one-token runs first):  [B9 | A0 A1 A2 A3 A4],  query_start_loc 0 1 6

Runs may be written past a request's computed tokens (a draft's own guesses) only into slots
the scheduler keeps allocated (``Proposer.num_lookahead_tokens``); ``room`` says how many.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from tessellm.core.attention_batch import AttentionBatch
from tessellm.core.sampler import upload_tensor


@dataclass
class Run:
    token_ids: list[int]  # inputs at positions start .. start + len - 1
    start: int
    block_ids: list[int]


@dataclass
class DraftBatch:
    input_ids: torch.Tensor  # int64 [T]
    positions: torch.Tensor  # int64 [T]
    attention: AttentionBatch
    order: list[int]  # flat run order -> index into the runs given
    last_rows: torch.Tensor  # int64 [S]: the last row of each run, in the runs' given order


def build_draft_batch(runs: list[Run], block_size: int, device: torch.device) -> DraftBatch:
    """One forward's inputs for ``runs`` (each at least one token)."""
    order = sorted(range(len(runs)), key=lambda i: len(runs[i].token_ids) != 1)
    lens = np.fromiter((len(runs[i].token_ids) for i in order), dtype=np.int64, count=len(order))
    starts = np.fromiter((runs[i].start for i in order), dtype=np.int64, count=len(order))
    qsl = np.zeros(len(order) + 1, dtype=np.int32)
    np.cumsum(lens, out=qsl[1:])
    num_tokens = int(qsl[-1])
    positions = np.arange(num_tokens, dtype=np.int64) - np.repeat(qsl[:-1] - starts, lens)
    seq_lens = (starts + lens).astype(np.int32)
    width = max(len(runs[i].block_ids) for i in order)
    table = np.zeros((len(order), width), dtype=np.int32)
    for s, i in enumerate(order):
        table[s, :len(runs[i].block_ids)] = runs[i].block_ids
    req = np.repeat(np.arange(len(order)), lens)
    slots = table[req, positions // block_size].astype(np.int64) * block_size + positions % block_size
    ids = np.concatenate([np.asarray(runs[i].token_ids, dtype=np.int64) for i in order])
    last = np.empty(len(runs), dtype=np.int64)
    last[np.asarray(order, dtype=np.int64)] = qsl[1:] - 1
    num_decodes = int(np.argmax(lens != 1)) if (lens != 1).any() else len(order)

    def put(a):
        return upload_tensor(torch.from_numpy(a), device)

    attn = AttentionBatch(
        num_tokens=num_tokens, num_seqs=len(order), num_decodes=num_decodes,
        query_start_loc=put(qsl), seq_lens=put(seq_lens), block_tables=put(table),
        slot_mapping=put(slots), max_query_len=int(lens.max()), max_seq_len=int(seq_lens.max()),
        query_start_loc_host=qsl.tolist(), seq_lens_host=seq_lens.tolist())
    return DraftBatch(put(ids), put(positions), attn, order, put(last))


def decode_arrays(starts: list[int], blocks: list[list[int]], block_size: int, size: int,
                  width: int = 0) -> tuple[np.ndarray, ...]:
    """Host inputs for one token per request at ``starts``, padded to ``size`` rows (padding:
    slot -1, length 0) and a block table at least ``width`` wide: positions, slots, seq lens,
    table. The inputs' ids come from the device (the previous draft step's argmax)."""
    n = len(starts)
    width = max(width, max(len(b) for b in blocks))
    pos = np.zeros(size, dtype=np.int64)
    pos[:n] = starts
    table = np.zeros((size, width), dtype=np.int32)
    for i, b in enumerate(blocks):
        table[i, :len(b)] = b
    slots = np.full(size, -1, dtype=np.int64)
    slots[:n] = table[np.arange(n), pos[:n] // block_size].astype(np.int64) * block_size + pos[:n] % block_size
    seq_lens = np.zeros(size, dtype=np.int32)
    seq_lens[:n] = pos[:n] + 1
    return pos, slots, seq_lens, table


def decode_batch(starts: list[int], blocks: list[list[int]], block_size: int,
                 device: torch.device) -> tuple[torch.Tensor, AttentionBatch]:
    """Positions and an eager AttentionBatch for one token per request at ``starts``."""
    n = len(starts)
    pos, slots, seq_lens, table = decode_arrays(starts, blocks, block_size, n)
    qsl = np.arange(n + 1, dtype=np.int32)

    def put(a):
        return upload_tensor(torch.from_numpy(a), device)

    attn = AttentionBatch(
        num_tokens=n, num_seqs=n, num_decodes=n, query_start_loc=put(qsl), seq_lens=put(seq_lens),
        block_tables=put(table), slot_mapping=put(slots), max_query_len=1,
        max_seq_len=int(seq_lens.max()), query_start_loc_host=qsl.tolist(),
        seq_lens_host=seq_lens.tolist())
    return put(pos), attn


def room(num_blocks: int, block_size: int, first_position: int, k: int, max_position: int) -> int:
    """Draft steps (of ``k``) whose positions ``first_position, first_position + 1, ...`` have
    a slot in the request's blocks and a rotary position below ``max_position``."""
    limit = min(num_blocks * block_size, max_position)
    return max(0, min(k, limit - first_position))
