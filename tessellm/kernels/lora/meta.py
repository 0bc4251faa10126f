"""The per-step LoRA batch layout every shrink/expand launch of the step shares: token rows grouped
by adapter slot and padded so that every block of ``block_m`` rows belongs to one slot.

Rows without an adapter (slot -1) form one more group, slot ``S``, which the kernels skip (the
shrink writes their zeros)::

    token_slots (S=4)   [ 2 -1  0  2  2 ]
    groups              slot 0: row 2   slot 2: rows 0 3 4   slot 4 (none): row 1
    block_m = 2         sorted_ids  [2 5 | 0 3 | 4 5 | 1 5 | 5 5 ...]   block_slot [0 2 2 4 ..]
                        (5 = T: a pad row, masked off)

No host synchronisation (the MoE kernel's two-launch alignment, ``moe/align.py``), fixed output
sizes for a given ``T``: ``prepare`` can run inside a captured CUDA graph and its tensors serve
every layer of the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tessellm import envs
from tessellm.kernels.moe.align import align_by_expert_triton


@dataclass
class LoRABatchMeta:
    token_slots: torch.Tensor  # int32 [T], -1 = no adapter (as given to prepare)
    num_slots: int  # S
    block_m: int  # rows per block of sorted_ids
    sorted_ids: torch.Tensor  # int32 [L]: row ids grouped by slot, pad rows hold T
    block_slot: torch.Tensor  # int32 [L / block_m]: the slot of each block (S: no adapter)
    num_padded: torch.Tensor  # int32 [1]: blocks past num_padded / block_m are empty

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]


def block_rows(num_tokens: int) -> int:
    """Rows per block: short blocks for decode-sized batches (a few rows per adapter), longer
    ones for prefill so each adapter's weights are read once per 64 rows."""
    if envs.triton_interpret():
        return 4 if num_tokens <= 16 else 16
    return 16 if num_tokens <= 256 else 64


def prepare(token_slots: torch.Tensor, num_slots: int) -> LoRABatchMeta:
    block_m = block_rows(token_slots.shape[0])
    ids = torch.where(token_slots < 0, num_slots, token_slots.to(torch.int32))
    # Two Triton launches (a histogram plan, an atomic scatter): the order of rows inside a
    # slot's blocks is the atomics', which no kernel here depends on.
    sorted_ids, block_slot, num_padded = align_by_expert_triton(ids[:, None], num_slots + 1,
                                                                block_m)
    return LoRABatchMeta(token_slots, num_slots, block_m, sorted_ids, block_slot, num_padded)
