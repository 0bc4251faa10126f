"""Token alignment by expert: the (token, slot) pairs of a top-k routing, sorted by expert and
padded so that every block of ``block_m`` rows belongs to one expert.

Invariant: rows ``[b * block_m, (b + 1) * block_m)`` of ``sorted_ids`` all go to expert
``block_expert[b]``; a pad row holds ``T * k`` (one past the last pair) and is skipped::

    ids (T=3, k=2)   [[2, 0], [0, 1], [2, 0]]    pairs p = t * k + slot: 0..5
    by expert        e0: p 1, 2, 5   e1: p 3   e2: p 0, 4
    block_m = 4      sorted_ids  [1 2 5 6 | 3 6 6 6 | 0 4 6 6 | 6 ...]   block_expert [0 1 2 ..]
                     num_padded = 12 (blocks past it are skipped by the kernel)

No host synchronisation: the output has the static worst-case length
``T * k + min(E, T * k) * (block_m - 1)`` rounded up to a block (at most ``min(E, T * k)``
experts hold pairs, each wasting under a block), so it can run inside a captured graph, and
the grouped GEMM's grid (one row of programs per block of that length) has no empty blocks
beyond that bound: 8 blocks of 16 rows at one token with top-8 of 128 experts, not 121.

Two implementations of the same layout: ``align_by_expert`` in pure torch (the reference;
about 25 small kernels with a radix sort, 60 us of a 94 us MoE layer at one token on an H200)
and ``align_by_expert_triton`` in two Triton launches (``_align_plan_kernel``: one program
counts the pairs per expert with ``tl.histogram``, pads the counts to blocks, writes each
expert's first row, ``block_expert`` and ``num_padded`` and fills ``sorted_ids`` with the pad
value; ``_align_scatter_kernel``: each pair takes the next row of its expert by an atomic
increment). The Triton version orders the pairs inside an expert's rows by the atomics, not by
pair index: the grouped GEMM computes each row from its own pair alone, so the MoE output is the
same; only ``sorted_ids``' order inside an expert differs from the reference's.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_args, pdl_start


def _length(pairs: int, num_experts: int, block_m: int) -> int:
    used = min(num_experts, pairs)  # experts that can hold a pair
    return max(1, -(-(pairs + used * (block_m - 1)) // block_m)) * block_m


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
    length = _length(pairs, num_experts, block_m)
    sorted_ids = torch.full((length,), pairs, dtype=torch.int32, device=ids.device)
    sorted_ids[starts[sorted_e] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, length, block_m, device=ids.device)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp_(max=num_experts - 1)
    return sorted_ids, block_expert.to(torch.int32), ends[-1:].to(torch.int32)


@triton.jit
def _align_plan_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, block_expert_ptr, num_padded_ptr,
                       P, E, L, BLOCK_M: tl.constexpr, BINS: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_B: tl.constexpr, USE_PDL: tl.constexpr):
    """One program. BINS: a power of two > E; bin E collects the masked-off lanes."""
    pdl_start(USE_PDL)
    counts = tl.zeros([BINS], dtype=tl.int32)
    for p0 in range(0, P, BLOCK_P):
        p = p0 + tl.arange(0, BLOCK_P)
        e = tl.load(ids_ptr + p, mask=p < P, other=E).to(tl.int32)
        counts += tl.histogram(e, BINS)
    bins = tl.arange(0, BINS)
    counts = tl.where(bins < E, counts, 0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    ends = tl.cumsum(padded, 0)
    tl.store(cursor_ptr + bins, ends - padded, mask=bins < E)
    tl.store(num_padded_ptr, tl.sum(padded, 0))
    for b0 in range(0, L // BLOCK_M, BLOCK_B):
        b = b0 + tl.arange(0, BLOCK_B)
        # searchsorted(ends, b * BLOCK_M, right=True): experts whose rows end at or before it
        hit = (ends[None, :] <= (b * BLOCK_M)[:, None]) & (bins[None, :] < E)
        expert = tl.minimum(tl.sum(hit.to(tl.int32), 1), E - 1)
        tl.store(block_expert_ptr + b, expert, mask=b < L // BLOCK_M)
    for r0 in range(0, L, BLOCK_P):
        r = r0 + tl.arange(0, BLOCK_P)
        tl.store(sorted_ids_ptr + r, tl.zeros([BLOCK_P], dtype=tl.int32) + P, mask=r < L)


@triton.jit
def _align_scatter_kernel(ids_ptr, cursor_ptr, sorted_ids_ptr, P, E, BLOCK: tl.constexpr,
                          USE_PDL: tl.constexpr):
    """A pair of id E (or above: an expert another rank holds) takes no row."""
    pdl_start(USE_PDL)
    p = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    e = tl.load(ids_ptr + p, mask=p < P, other=0).to(tl.int32)
    ok = (p < P) & (e < E)
    row = tl.atomic_add(cursor_ptr + e, tl.full([BLOCK], 1, tl.int32), mask=ok)
    tl.store(sorted_ids_ptr + row, p.to(tl.int32), mask=ok)


def align_by_expert_triton(ids: torch.Tensor, num_experts: int, block_m: int):
    """``align_by_expert``'s layout in two Triton launches (module docstring: rows inside an
    expert in atomic order). ``ids [T, k]`` integer, on a Triton device (or the CPU under
    TRITON_INTERPRET=1). An id of ``num_experts`` marks a pair to skip (expert parallelism:
    its expert is another rank's): it is counted nowhere and takes no row."""
    flat = ids.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    pairs = flat.numel()
    length = _length(pairs, num_experts, block_m)
    dev = ids.device
    sorted_ids = torch.empty(length, dtype=torch.int32, device=dev)
    block_expert = torch.empty(length // block_m, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    cursor = torch.empty(num_experts, dtype=torch.int32, device=dev)
    bins = triton.next_power_of_2(num_experts + 1)
    _align_plan_kernel[(1,)](flat, cursor, sorted_ids, block_expert, num_padded, pairs,
                             num_experts, length, BLOCK_M=block_m, BINS=bins,
                             BLOCK_P=1024, BLOCK_B=max(1, 4096 // bins), num_warps=4,
                             **pdl_args(dev))
    block = 256
    _align_scatter_kernel[(triton.cdiv(max(pairs, 1), block),)](
        flat, cursor, sorted_ids, pairs, num_experts, BLOCK=block, num_warps=4, **pdl_args(dev))
    return sorted_ids, block_expert, num_padded
