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

from dataclasses import dataclass
from typing import Callable

import torch

from tessellm.core.kv_offload import LOAD, STORE

MAX_CHUNK = 1 << 30
ALIGN = 64  # bytes: each tensor's region in a chunk starts on a cache line


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
        self.chunks: list[Chunk] = []
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
        """The step's copies, in order: each run of stores or of loads is one ``swap_blocks``
        per cache tensor and chunk it touches."""
        i = 0
        while i < len(transfers):
            j = i
            while j < len(transfers) and transfers[j][0] == transfers[i][0]:
                j += 1
            self._run(transfers[i][0], [(int(t[1]), int(t[2])) for t in transfers[i:j]], caches,
                      swap_blocks)
            i = j

    def _run(self, kind: int, pairs: list[tuple[int, int]], caches, swap_blocks) -> None:
        for chunk in self.chunks:
            lo, hi = chunk.first_slot, chunk.first_slot + chunk.num_slots
            if kind == STORE:  # (device block, host slot)
                mapping = [(d, s - lo) for d, s in pairs if lo <= s < hi]
            else:  # LOAD: (host slot, device block)
                mapping = [(s - lo, d) for s, d in pairs if lo <= s < hi]
            if not mapping:
                continue
            for dev, host in zip(caches, chunk.tensors):
                if kind == STORE:
                    swap_blocks(dev, host, mapping)
                elif kind == LOAD:
                    swap_blocks(host, dev, mapping)


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
