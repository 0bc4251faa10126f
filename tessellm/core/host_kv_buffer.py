"""One rank's host buffer of the prefix cache's host tier (``core/kv_offload.py``), and the
step's copies between it and the device cache.

The buffer mirrors the device cache: for each cache tensor (keys and values of each attention
layer, block-major) a host tensor of the same block shape and dtype. It is allocated in
**chunks**, each holding a range of host slots for every tensor::

    chunk 0 (1 GiB)   slots 0..N0-1   [k0: N0 blocks][v0: N0 blocks][k1 ...]...   (waste < a slot)
    chunk 1 (512 MiB) slots N0..      [k0 ...][v0 ...]...
    ...

because pinned memory comes from torch's caching host allocator, which rounds every request up
to a power of two: chunks of exactly a power of two bytes (at most 1 GiB) keep what is pinned
within a few slots of what was asked, where one tensor per layer could pin nearly twice that.
On a device that does not pin (the cpu backend) one chunk holds every slot, lazily backed.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch

from tessellm.backends.reference.kv_transfer import BlockCopies
from tessellm.backends.reference.kv_transfer import swap_blocks as reference_swap_blocks
from tessellm.core.kv_offload import LOAD, STORE, copy_phases

MAX_CHUNK = 1 << 30
ALIGN = 64  # bytes: each tensor's region in a chunk starts on a cache line
# Bytes of one tensor's blocks in one copy call at most: the device-side temporary of a batched
# copy (``BlockCopies``) lives in a side stream's pool of the caching allocator, so it is kept
# small (Llama-3.1-8B: 1024 blocks of 32 KiB, a 16k-token reload, in one call per tensor).
MAX_COPY_BYTES = 32 << 20


@dataclass
class Chunk:
    first_slot: int
    num_slots: int
    tensors: list[torch.Tensor]  # one per cache tensor, [num_slots, *block shape]


class HostKVBuffer:
    def __init__(self, caches: list[torch.Tensor], num_blocks: int, pin: bool,
                 zeros: Callable[[int], torch.Tensor]):
        """``caches``: the device cache tensors, block-major; ``zeros(nbytes)``: lazily backed
        host bytes (uint8) for a buffer that is not pinned."""
        self.block_bytes = [_aligned(_bytes_per_block(t)) for t in caches]
        self.max_copy_blocks = max(1, MAX_COPY_BYTES // max(map(_bytes_per_block, caches)))
        self.chunks: list[Chunk] = []
        self.copy_calls = 0  # copies made: one per cache tensor, chunk and phase's stores or loads
        self._streams = None  # the side streams, made at the first copy (False: none)
        first = 0
        while first < num_blocks:
            n, arena = num_blocks - first, None
            if pin:
                n, nbytes = self._chunk_size(n)
                arena = _pinned(nbytes)
                if arena is None:  # the runtime cannot pin: one lazily backed chunk for the rest
                    pin, n = False, num_blocks - first
            if arena is None:
                arena = zeros(max(1, n * sum(self.block_bytes)))
            self.chunks.append(Chunk(first, n, self._carve(arena, caches, n)))
            first += n

    @property
    def pinned(self) -> bool:
        return bool(self.chunks) and self.chunks[0].tensors[0].is_pinned()

    def _chunk_size(self, remaining: int) -> tuple[int, int]:
        """(slots, bytes) of the next pinned chunk: the largest power of two up to 1 GiB that
        the remaining slots fill, or, for the last few slots, the power of two above them."""
        per_slot = sum(self.block_bytes)
        want = remaining * per_slot
        size = 1 << (min(want, MAX_CHUNK).bit_length() - 1)  # largest power of two <= both
        if size < per_slot:
            size = 1 << (want - 1).bit_length()  # the tail: round up, as the allocator would
        return min(remaining, size // per_slot), size

    def _carve(self, arena: torch.Tensor, caches: list[torch.Tensor], n: int) -> list[torch.Tensor]:
        out, offset = [], 0
        for cache, nbytes in zip(caches, self.block_bytes):
            region = arena[offset:offset + n * _bytes_per_block(cache)]
            out.append(region.view(cache.dtype).view(n, *cache.shape[1:]))
            offset += n * nbytes
        return out

    def apply(self, transfers: list, caches: list[torch.Tensor], swap_blocks) -> None:
        """The step's copies (``kv_offload.copy_phases``: all stores then all loads, unless
        their order forbids), each phase's stores and loads one copy call per cache tensor and
        chunk. ``swap_blocks``: the backend's op, or the reference (then each mapping is
        planned once for every tensor: ``BlockCopies``).

        On a device with streams the stores go on one side stream and the loads on another,
        tensor by tensor: a tensor's loads wait for its stores (an event), so the next
        tensor's device -> host copy runs beside this one's host -> device copy (PCIe is
        full duplex). Both streams start after the work queued so far on the current stream
        (the previous step's forward wrote what a store reads) and the current stream waits
        for both (the forward reads what a load wrote): ordered as on one stream, no host
        sync."""
        phases = copy_phases(transfers)
        device = caches[0].device
        streams = self._side_streams(device)
        planned = swap_blocks is reference_swap_blocks
        ops = []  # (kind, chunk, copy(src, dst)), in the order they must run on each tensor
        for stores, loads in phases:
            for kind, pairs in ((STORE, stores), (LOAD, loads)):
                for chunk, mapping in self._by_chunk(kind, pairs):
                    with _on(streams and streams[kind]):
                        ops.append((kind, chunk, _copier(mapping, kind, device, planned, swap_blocks)))
        if streams is None:
            for t, cache in enumerate(caches):
                for kind, chunk, copy in ops:
                    self._copy(kind, copy, cache, chunk.tensors[t])
            return
        ready = torch.Event(device=device)
        ready.record()  # on the current stream: the work queued so far
        for stream in streams.values():
            stream.wait_event(ready)
        for t, cache in enumerate(caches):
            for i, (kind, chunk, copy) in enumerate(ops):
                stream = streams[kind]
                with stream:
                    if i and ops[i - 1][0] != kind:  # this tensor's previous copy, other stream
                        stream.wait_event(done)
                    self._copy(kind, copy, cache, chunk.tensors[t])
                    if i + 1 < len(ops) and ops[i + 1][0] != kind:
                        done = torch.Event(device=device)
                        done.record(stream)
        for stream in streams.values():
            done = torch.Event(device=device)
            done.record(stream)
            done.wait()  # the current stream waits for the stream's copies

    def _copy(self, kind: int, copy, cache: torch.Tensor, host: torch.Tensor) -> None:
        if kind == STORE:
            copy(cache, host)
        else:
            copy(host, cache)
        self.copy_calls += 1

    def _by_chunk(self, kind: int, pairs: list[tuple[int, int]]):
        """``(chunk, mapping)`` for each chunk the pairs touch, slots made chunk-relative, in
        pieces of at most ``max_copy_blocks`` pairs."""
        for chunk in self.chunks:
            lo, hi = chunk.first_slot, chunk.first_slot + chunk.num_slots
            if kind == STORE:  # (device block, host slot)
                mapping = [(d, s - lo) for d, s in pairs if lo <= s < hi]
            else:  # LOAD: (host slot, device block)
                mapping = [(s - lo, d) for s, d in pairs if lo <= s < hi]
            step = self.max_copy_blocks
            for i in range(0, len(mapping), step):
                yield chunk, mapping[i:i + step]

    def _side_streams(self, device: torch.device):
        """{STORE: stream, LOAD: stream} of a pinned buffer's device, made once; None where
        the copies stay on the current stream (the cpu, a device without streams)."""
        if self._streams is None:
            self._streams = False
            if self.pinned and device.type not in ("cpu", "xla"):
                try:
                    self._streams = {STORE: torch.Stream(device=device),
                                     LOAD: torch.Stream(device=device)}
                except (RuntimeError, TypeError, ValueError):
                    pass
        return self._streams or None


def _on(stream):
    """``with`` the stream current, or nothing."""
    return stream if stream else contextlib.nullcontext()


def _copier(mapping, kind: int, device: torch.device, planned: bool, swap_blocks):
    """``copy(src, dst)`` for one mapping: the reference's plan (made once, used for every
    tensor) or the backend's ``swap_blocks``."""
    if not planned:
        return lambda src, dst: swap_blocks(src, dst, mapping)
    cpu = torch.device("cpu")
    if kind == STORE:
        return BlockCopies(mapping, device, cpu)
    return BlockCopies(mapping, cpu, device)


def _bytes_per_block(t: torch.Tensor) -> int:
    return t[0].numel() * t.element_size()


def _aligned(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


def _pinned(nbytes: int):
    """``nbytes`` pinned host bytes (a power of two: the allocator pins exactly that), or None
    where the runtime cannot pin."""
    try:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    except RuntimeError:
        return None
