"""The reference ``swap_blocks``: copies whole KV blocks between two caches (the host tier of
the prefix cache, ``core/kv_offload.py``), in plain torch.

Each tensor is block-major, ``[num_blocks, ...]`` with the same trailing shape and dtype on
both sides; one side may be a (pinned) host buffer and the other the device cache. A few
launches per call, not one per block: the device side is gathered or scattered by index in one
kernel, and the host side is copied in runs of consecutive slots (a slice each)::

    store (device -> host), mapping (9, 4) (2, 5) (7, 6) (3, 0)
        sorted by host slot:   (3, 0) | (9, 4) (2, 5) (7, 6)
        device gather:         tmp = cache[[3, 9, 2, 7]]            (one kernel)
        host runs:             host[0:1] <- tmp[0:1]; host[4:7] <- tmp[1:4]
    load (host -> device), mapping (4, 10) (5, 11) (0, 2)
        host runs:             tmp[0:2] <- host[4:6]; tmp[2:3] <- host[0:1]
        device scatter:        cache[[10, 11, 2]] = tmp              (one kernel)

Copies between a pinned host buffer and the device are ``non_blocking``: queued on the current
stream, the host goes on; later work on that stream sees them done (the temporaries go back to
the caching allocator stream-ordered, so their reuse waits for the copies too). A mapping that
writes one block twice (a later pair wins) is copied pair by pair, in order.
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
    mapping = [(int(s), int(d)) for s, d in mapping]
    runs = block_runs(mapping)
    if len(runs) <= 2 or len({d for _, d in mapping}) < len(mapping):
        for s, d, n in runs:  # few runs, or a block written twice: slices, in order
            dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
        return
    if src.element_size() == 1 and src.dtype != torch.uint8:  # fp8: index ops on the bytes
        src, dst = src.view(torch.uint8), dst.view(torch.uint8)
    if src.device == dst.device:  # both caches in one memory (the cpu backend's tier)
        index = torch.tensor([s for s, _ in mapping], device=src.device)
        dst.index_copy_(0, torch.tensor([d for _, d in mapping], device=dst.device),
                        src.index_select(0, index))
    elif dst.device.type == "cpu":
        store_gathered(src, dst, mapping)
    else:
        load_scattered(src, dst, mapping)


def store_gathered(src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
    """Device -> host: gather the device blocks in host-slot order (one kernel), then copy
    each run of consecutive host slots (a slice each). No host slot twice in ``mapping``."""
    mapping = sorted(mapping, key=lambda p: p[1])
    tmp = src.index_select(0, _index([s for s, _ in mapping], src.device))
    _host_runs(mapping, lambda i, a, n: dst[a:a + n].copy_(tmp[i:i + n], non_blocking=True), key=1)


def load_scattered(src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
    """Host -> device: copy each run of consecutive host slots into one device buffer, then
    scatter it into the device blocks (one kernel). No device block twice in ``mapping``."""
    mapping = sorted(mapping, key=lambda p: p[0])
    tmp = torch.empty((len(mapping), *src.shape[1:]), dtype=src.dtype, device=dst.device)
    _host_runs(mapping, lambda i, a, n: tmp[i:i + n].copy_(src[a:a + n], non_blocking=True), key=0)
    dst.index_copy_(0, _index([d for _, d in mapping], dst.device), tmp)


def _index(ids: list[int], device: torch.device) -> torch.Tensor:
    """The block ids on ``device``, sent from pinned memory: a copy from pageable memory would
    make the host wait for the stream's queued work (CUDA syncs the stream first)."""
    index = torch.tensor(ids, dtype=torch.int64)
    if device.type == "cpu":
        return index
    try:
        index = index.pin_memory()  # the pinned cache keeps it until the copy is done
    except RuntimeError:
        pass
    return index.to(device, non_blocking=True)


def _host_runs(mapping: list[tuple[int, int]], copy, key: int) -> None:
    """``copy(i, start, n)`` for each run of consecutive host blocks (``p[key]``) in the sorted
    ``mapping``: rows ``i..i+n`` of the device-side buffer."""
    i = 0
    while i < len(mapping):
        j = i + 1
        while j < len(mapping) and mapping[j][key] == mapping[j - 1][key] + 1:
            j += 1
        copy(i, mapping[i][key], j - i)
        i = j
