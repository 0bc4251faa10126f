"""The per-step attention inputs the model runner hands to a backend's attention kernel."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionBatch:
    """One step's sequences, flattened. Decode sequences (one query token) come first.

    Picture for three sequences, the first a decode, the others prefill chunks::

        tokens (flat):   | d0 | p1 p1 p1 | p2 p2 |
        query_start_loc:  0    1          4       6
        seq_lens:         ctx0+1, ctx1+3, ctx2+2   (cached context + this step's queries)

    Query ``i`` of sequence ``s`` sits at absolute position ``seq_lens[s] - query_len[s] + i``
    and attends causally to every key at positions ``<=`` that (minus a sliding window).
    """

    num_tokens: int  # total query tokens this step (rows of q)
    num_seqs: int
    num_decodes: int  # the first num_decodes sequences have exactly one query token
    query_start_loc: torch.Tensor  # int32 [num_seqs + 1], cumulative query lengths, on device
    seq_lens: torch.Tensor  # int32 [num_seqs], context + this step's queries, on device
    block_tables: torch.Tensor  # int32 [num_seqs, max_blocks_per_seq], on device; pad with 0
    slot_mapping: torch.Tensor  # int64 [num_tokens], cache slot each new k/v goes to; -1 = skip
    max_query_len: int
    max_seq_len: int
    # Host copies, for kernels that loop over sequences on the CPU. Plain lists of ints.
    query_start_loc_host: list[int]
    seq_lens_host: list[int]
