"""Token alignment by expert: the (token, slot) pairs of a top-k routing, sorted by expert and
padded so that every block of ``block_m`` rows belongs to one expert.

Invariant: rows ``[b * block_m, (b + 1) * block_m)`` of ``sorted_ids`` all go to expert
``block_expert[b]``; a pad row holds ``T * k`` (one past the last pair) and is skipped::

    ids (T=3, k=2)   [[2, 0], [0, 1], [2, 0]]    pairs p = t * k + slot: 0..5
    by expert        e0: p 1, 2, 5   e1: p 3   e2: p 0, 4
    block_m = 4      sorted_ids  [1 2 5 6 | 3 6 6 6 | 0 4 6 6 | 6 ...]   block_expert [0 1 2 ..]
                     num_padded = 12 (blocks past it are skipped by the kernel)

Pure torch, no host synchronisation: the output has the static worst-case length
``T * k + E * (block_m - 1)`` rounded up to a block, so it can run inside a captured graph.
"""

from __future__ import annotations

import torch


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int):
    """``ids [T, k]`` -> ``(sorted_ids [L] int32, block_expert [L / block_m] int32,
    num_padded [1] int32)``."""
    flat = ids.flatten().to(torch.int64)
    pairs = flat.numel()
    # scatter_add, not bincount: bincount sizes its output from the data (a host sync).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = torch.cumsum(padded, 0)
    starts = ends - padded
    order = torch.argsort(flat, stable=True)
    sorted_e = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    rank = torch.arange(pairs, device=ids.device) - first_of_expert[sorted_e]
    length = -(-(pairs + num_experts * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((length,), pairs, dtype=torch.int32, device=ids.device)
    sorted_ids[starts[sorted_e] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, length, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)
