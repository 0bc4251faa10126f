"""The reference ``swap_blocks``: copies whole KV blocks between two caches (the host tier of
the prefix cache, ``core/kv_offload.py``), in plain torch.

Each tensor is block-major, ``[num_blocks, ...]`` with the same trailing shape and dtype on
both sides; one side may be a (pinned) host buffer and the other the device cache. Runs of
consecutive block ids on both sides become one slice copy::

    mapping  (4, 10) (5, 11) (6, 12) (9, 2)
    copies   dst[10:13] <- src[4:7]      dst[2:3] <- src[9:10]

``non_blocking``: a copy between a pinned host buffer and the device is queued on the current
stream and the host goes on; every later use of either tensor on that stream sees it done.
"""

from __future__ import annotations

from typing import Sequence

import torch


def block_runs(mapping: Sequence[Sequence[int]]) -> list[tuple[int, int, int]]:
    """``(src_start, dst_start, length)`` for each run of consecutive pairs in ``mapping``."""
    runs: list[list[int]] = []
    for src, dst in mapping:
        if runs and src == runs[-1][0] + runs[-1][2] and dst == runs[-1][1] + runs[-1][2]:
            runs[-1][2] += 1
        else:
            runs.append([int(src), int(dst), 1])
    return [tuple(r) for r in runs]


def swap_blocks(src: torch.Tensor, dst: torch.Tensor, mapping: Sequence[Sequence[int]]) -> None:
    """``dst[d] = src[s]`` for every ``(s, d)`` of ``mapping``, in order (the contract:
    ``FusedOps.swap_blocks`` in ``backends/spec.py``)."""
    if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
        raise ValueError(f"swap_blocks copies between caches of one block shape and dtype, got "
                         f"{tuple(src.shape)} {src.dtype} -> {tuple(dst.shape)} {dst.dtype}.")
    for s, d, n in block_runs(mapping):
        dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
