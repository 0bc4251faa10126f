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

``BlockCopies(mapping, ...)`` does the planning (sorting, runs, the index on the device) once
for every cache tensor that shares a mapping (the host tier's and a KV connector's copies
apply one mapping to each layer's keys and values): ``swap_blocks`` is one plan, one copy.
"""

from __future__ import annotations

from typing import Optional, Sequence

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
    BlockCopies(mapping, src.device, dst.device)(src, dst)


class BlockCopies:
    """One mapping's copies, planned once, applied to any number of ``(src, dst)`` cache
    pairs of the given devices (each call: ``dst[d] = src[s]`` for every pair, in order).

    Build it, and call it, on the stream the copies go on: the device-side index it holds is
    allocated there (stream-ordered reuse). Per call: a few slice copies (few runs, or a block
    written twice), or one ``index_copy_`` (both in one memory), or one gather plus a copy per
    run of host slots (store), or a copy per run plus one scatter (load)."""

    def __init__(self, mapping: Sequence[Sequence[int]], src_device, dst_device,
                 path: Optional[str] = None):
        """``path``: force "store" (gather, host runs) or "load" (host runs, scatter), whatever
        the devices (the tests run the GPU's paths on host tensors); None: chosen here."""
        mapping = [(int(s), int(d)) for s, d in mapping]
        src_device, dst_device = torch.device(src_device), torch.device(dst_device)
        self.n = len(mapping)
        self.runs = block_runs(mapping)
        if path is None:
            if len(self.runs) <= 2 or len({d for _, d in mapping}) < len(mapping):
                path = "slices"  # few runs, or a block written twice: slices, in order
            elif src_device == dst_device:  # both caches in one memory (the cpu backend's tier)
                path = "index"
            else:  # device -> host: a store; host -> device: a load
                path = "store" if dst_device.type == "cpu" else "load"
        self.path = path
        if path == "index":
            self.src_index = _index([s for s, _ in mapping], src_device)
            self.dst_index = _index([d for _, d in mapping], dst_device)
        elif path == "store":  # gather on the device in host-slot order, then host runs
            mapping.sort(key=lambda p: p[1])
            self.src_index = _index([s for s, _ in mapping], src_device)
            self.runs = _host_runs(mapping, key=1)
        elif path == "load":  # host runs into one device buffer, then a scatter
            mapping.sort(key=lambda p: p[0])
            self.dst_index = _index([d for _, d in mapping], dst_device)
            self.runs = _host_runs(mapping, key=0)

    def __call__(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        if src.dtype != dst.dtype or src.shape[1:] != dst.shape[1:]:
            raise ValueError(f"swap_blocks copies between caches of one block shape and dtype, got "
                             f"{tuple(src.shape)} {src.dtype} -> {tuple(dst.shape)} {dst.dtype}.")
        if self.path == "slices":
            for s, d, n in self.runs:
                dst[d:d + n].copy_(src[s:s + n], non_blocking=True)
            return
        if src.element_size() == 1 and src.dtype != torch.uint8:  # fp8: index ops on the bytes
            src, dst = src.view(torch.uint8), dst.view(torch.uint8)
        if self.path == "index":
            dst.index_copy_(0, self.dst_index, src.index_select(0, self.src_index))
        elif self.path == "store":
            tmp = src.index_select(0, self.src_index)
            for i, a, n in self.runs:
                dst[a:a + n].copy_(tmp[i:i + n], non_blocking=True)
        else:
            tmp = torch.empty((self.n, *src.shape[1:]), dtype=src.dtype, device=dst.device)
            for i, a, n in self.runs:
                tmp[i:i + n].copy_(src[a:a + n], non_blocking=True)
            dst.index_copy_(0, self.dst_index, tmp)


def store_gathered(src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
    """Device -> host: gather the device blocks in host-slot order (one kernel), then copy
    each run of consecutive host slots (a slice each). No host slot twice in ``mapping``."""
    BlockCopies(mapping, src.device, dst.device, path="store")(src, dst)


def load_scattered(src: torch.Tensor, dst: torch.Tensor, mapping: list[tuple[int, int]]) -> None:
    """Host -> device: copy each run of consecutive host slots into one device buffer, then
    scatter it into the device blocks (one kernel). No device block twice in ``mapping``."""
    BlockCopies(mapping, src.device, dst.device, path="load")(src, dst)


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


def _host_runs(mapping: list[tuple[int, int]], key: int) -> list[tuple[int, int, int]]:
    """``(i, start, n)`` for each run of consecutive host blocks (``p[key]``) in the sorted
    ``mapping``: rows ``i..i+n`` of the device-side buffer, host blocks ``start..start+n``."""
    runs = []
    i = 0
    while i < len(mapping):
        j = i + 1
        while j < len(mapping) and mapping[j][key] == mapping[j - 1][key] + 1:
            j += 1
        runs.append((i, mapping[i][key], j - i))
        i = j
    return runs
