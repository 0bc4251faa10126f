"""Launch shapes of the split-KV decode kernel at large batches, chosen by measurement.

``DECODE_TABLE[(kind, fewest_decodes)] = (BLOCK_N, num_warps, num_stages, head_major, splits
[, fp8_convert])``: for a decode batch of at least ``fewest_decodes`` sequences (the largest
such key of its ``kind`` wins) on a cache of ``kind`` (``cache_kind``: "fp8" for an e4m3 cache
widened by ``cvt``, else the 16-bit dtype's name). ``head_major``: the grid's first axis is the
KV head (``_decode_split_kernel``'s HEAD_MAJOR). ``splits``: splits per (sequence, KV head), or
0 for ``TritonAttentionKernel.num_splits``'s rule. ``fp8_convert`` (fp8 only, optional): how
the e4m3 tiles are widened where the caller says "auto" (``common._FP8_CONVERT``: "kdot" widens
K inside the dot's operand load, by Triton, and V by ``cvt`` in registers). num_stages counts
the pipeliner's stages: the K/V tiles' loads depend on the block-table load before them, so 3-4
stages give one shared-memory buffer (the next tile's loads start only after the current tile
is consumed) and 5 give two (one tile in flight while the other is computed).

Batches with no entry (and verify steps, prefetching and rotary-fused decodes) keep
``decode._default_tiles``. Written by ``benchmarks/quantization/decode_sweep.py
--write-table`` (H200, Llama-3.1-8B heads, contexts 512-768; benchmarks/results).
"""

from __future__ import annotations

from typing import Optional

import torch

DECODE_TABLE: dict[tuple[str, int], tuple] = {  # NVIDIA H200, 2026-12-04
    ('fp8', 128): (64, 2, 5, False, 0, 'kdot'),
    ('fp8', 256): (64, 2, 5, False, 0, 'kdot'),
}


def cache_kind(cache_dtype: torch.dtype, fp8_ptx: int) -> str:
    if fp8_ptx:
        return "fp8"
    return str(cache_dtype).removeprefix("torch.")


def lookup(kind: str, num_decodes: int,
           table: Optional[dict] = None) -> Optional[tuple]:
    """The entry for ``num_decodes`` decodes on a ``kind`` cache, or None."""
    table = DECODE_TABLE if table is None else table
    keys = [n for (k, n) in table if k == kind and n <= num_decodes]
    return table[(kind, max(keys))] if keys else None
