"""The host tier of the prefix cache: KV blocks evicted from the device, kept in host memory.

Plain Python, no torch: slots of a host buffer and block hashes. The buffer itself lives in
each model runner (``runner_kv_cache.py``), one per rank, each holding its own shard (tensor
parallelism) or its own layers (pipeline stages); every rank applies the same transfers.

Life of a prefix block (``--kv-offloading-size GiB``)::

    device cache (BlockManager)              host tier (this file)
    [b7 h0] published, then freed ...
    ... evicted for another request   --->   store: b7 -> slot 3, h0 -> 3 (LRU end)
                                             (copied before the step that overwrites b7)
    a prompt with prefix h0 comes back:
    device miss, host hit on h0       <---   load: slot 3 -> b2 (a fresh device block);
    b2 gets h0 in the device cache           b2 counts as computed: no recompute

Invariants
----------
* A hash is in at most one slot; a slot holds at most one hash. ``lru`` is ordered least
  recently used first; storing or loading a hash moves it to the end. A full tier evicts from
  the front (a slot being read by the allocation under way, ``hold``, is skipped).
* ``transfers`` is the ordered list of copies the next step's runners make before its forward
  pass: ``(STORE, device_block, slot)`` or ``(LOAD, slot, device_block)``, in the order the
  block manager decided them. Run in that order they are always right: a store reads a device
  block before a later load or the step's forward overwrites it; a load reads a slot before a
  later store reuses it. The scheduler hands them over with the step that is sent
  (``take_transfers``); an empty step keeps them for the next.
* A store copies a block whose tokens are computed and which no request holds: nothing
  writes it until the step that carries the store.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

from tessellm.core.cache_view import HOST, CacheEvents

STORE = 0  # device block -> host slot
LOAD = 1  # host slot -> device block

GIB = 1 << 30


@dataclass
class OffloadStats:
    """Totals since start (vLLM's names in the metrics: ``external_prefix_cache_*`` and
    ``kv_offload_total_bytes{transfer_type}``)."""

    queries: int = 0  # prompt tokens of admitted requests (each whole prompt, as vLLM counts them)
    hits: int = 0  # of which served from the host tier
    blocks_stored: int = 0  # device -> host copies
    blocks_loaded: int = 0  # host -> device copies
    bytes_per_block: int = 0  # one block's bytes over every rank (0: unknown)

    @property
    def bytes_stored(self) -> int:
        return self.blocks_stored * self.bytes_per_block

    @property
    def bytes_loaded(self) -> int:
        return self.blocks_loaded * self.bytes_per_block


class HostKVTier:
    """Which prefix hashes the host buffer holds, in which slots, least recently used first."""

    def __init__(self, num_blocks: int, bytes_per_block: int = 0):
        if num_blocks < 1:
            raise ValueError(f"The host KV tier needs at least one block, got {num_blocks}.")
        self.num_blocks = num_blocks
        self.lru: OrderedDict[int, int] = OrderedDict()  # block hash -> slot, LRU first
        self.free_slots: list[int] = list(range(num_blocks - 1, -1, -1))  # pop() gives slot 0 first
        self.held: set[int] = set()  # hashes an allocation under way is about to load
        self.transfers: list[tuple[int, int, int]] = []
        self.stats = OffloadStats(bytes_per_block=bytes_per_block)
        # Data parallelism: the hashes entering and leaving the tier, for the front end's
        # balancer (core/cache_view.py, ``tier=HOST``); None: not recorded.
        self.events: Optional[CacheEvents] = None

    @property
    def num_used(self) -> int:
        return len(self.lru)

    @property
    def usage(self) -> float:
        return len(self.lru) / self.num_blocks

    def stats_dict(self) -> dict:
        """The totals the metrics export (``EngineStats.kv_offload``)."""
        st = self.stats
        return {"queries": st.queries, "hits": st.hits, "bytes_stored": st.bytes_stored,
                "bytes_loaded": st.bytes_loaded, "usage": self.usage}

    def __contains__(self, block_hash: int) -> bool:
        return block_hash in self.lru

    def match(self, hashes: Iterable[int]) -> list[int]:
        """The leading run of ``hashes`` the tier holds (no LRU change: only a load touches)."""
        run = []
        for h in hashes:
            if h not in self.lru:
                break
            run.append(h)
        return run

    def store(self, block_hash: int, device_block: int) -> None:
        """A device block holding ``block_hash`` is being evicted: keep its contents. A hash
        the tier already holds only becomes most recent (equal hashes, equal contents)."""
        if block_hash in self.lru:
            self.lru.move_to_end(block_hash)
            return
        slot = self._free_slot()
        if slot is None:
            return  # every slot is being loaded from this very allocation: drop it
        self.lru[block_hash] = slot
        if self.events is not None:
            self.events.stored(block_hash, HOST)
        self.transfers.append((STORE, device_block, slot))
        self.stats.blocks_stored += 1

    def load(self, block_hash: int, device_block: int) -> None:
        """Copy ``block_hash`` back into ``device_block`` before the next step's forward."""
        slot = self.lru[block_hash]
        self.lru.move_to_end(block_hash)
        self.transfers.append((LOAD, slot, device_block))
        self.stats.blocks_loaded += 1

    def hold(self, hashes: Iterable[int]) -> None:
        """Keep these hashes from eviction until ``release`` (their loads are being placed)."""
        self.held.update(hashes)

    def release(self) -> None:
        self.held.clear()

    def clear(self) -> None:
        """Forget every stored hash (the prefix cache was reset: new weights, sleep mode); the
        buffer's contents are left to be overwritten."""
        self.lru.clear()
        self.free_slots = list(range(self.num_blocks - 1, -1, -1))
        self.held.clear()
        self.transfers = []

    def take_transfers(self) -> list[tuple[int, int, int]]:
        transfers, self.transfers = self.transfers, []
        return transfers

    def _free_slot(self) -> Optional[int]:
        if self.free_slots:
            return self.free_slots.pop()
        for victim in self.lru:
            if victim not in self.held:
                if self.events is not None:
                    self.events.removed(victim, HOST)
                return self.lru.pop(victim)
        return None


def copy_phases(transfers: list) -> list[tuple[list[tuple[int, int]], list[tuple[int, int]]]]:
    """The step's ``transfers`` as few batches as their order allows: ``(stores, loads)``
    phases, each run as all its stores (``(device block, slot)`` pairs, in order) then all its
    loads (``(slot, device block)``). A step that loads evicts too (each fresh block for a host
    hit may evict a cached one), so its transfers alternate store, load, store, load...: run
    as listed that is one copy per block and cache tensor (tens of thousands of small copies
    for a long prompt), batched it is one per tensor and phase.

    A store moves ahead of the phase's earlier loads unless that would change what it reads or
    what they read: a store of a device block a load of the phase writes (it must copy the
    loaded contents), or into a slot a load of the phase reads (the load needs the old ones).
    Such a store opens the next phase. Stores keep their order among themselves, as do loads
    (a block or slot written twice: the later copy wins, as listed). A load into a device block
    a load of the phase writes already opens the next phase too: the phase's loads are copied
    host chunk by host chunk (``HostKVBuffer.apply``), which keeps their order only within a
    chunk, and the two may read slots of different chunks."""
    phases: list[tuple[list, list]] = []
    loaded_blocks: set[int] = set()  # device blocks the current phase's loads write
    read_slots: set[int] = set()  # host slots they read
    for kind, a, b in transfers:
        a, b = int(a), int(b)
        if not phases or ((a in loaded_blocks or b in read_slots) if kind == STORE
                          else b in loaded_blocks):
            phases.append(([], []))
            loaded_blocks, read_slots = set(), set()
        if kind == STORE:
            phases[-1][0].append((a, b))
        else:
            phases[-1][1].append((a, b))
            read_slots.add(a)
            loaded_blocks.add(b)
    return phases


def host_tier_blocks(size_gib, bytes_per_block_all_ranks: int) -> int:
    """Blocks the host tier holds for ``--kv-offloading-size`` GiB over every rank (vLLM's
    meaning: under tensor parallelism the size is the sum over the ranks)."""
    if bytes_per_block_all_ranks <= 0:
        raise ValueError("kv_offloading_size needs a model with a paged KV cache; this one has none.")
    blocks = int(float(size_gib) * GIB) // bytes_per_block_all_ranks
    if blocks < 1:
        raise ValueError(f"kv_offloading_size={size_gib} GiB holds no KV block (one block is "
                         f"{bytes_per_block_all_ranks} bytes over all ranks); give at least "
                         f"{bytes_per_block_all_ranks / GIB:.6f} GiB.")
    return blocks


def check_kv_offloading_args(size, backend) -> None:
    """One clear error for a bad ``kv_offloading_size`` / ``kv_offloading_backend``."""
    if backend is not None and backend != "native":
        raise ValueError(f"kv_offloading_backend {backend!r} is not supported; use 'native' (the "
                         "host-memory tier built into tessellm) or leave it unset.")
    if size is None:
        if backend is not None:
            raise ValueError("kv_offloading_backend is set but kv_offloading_size is not; give "
                             "the host tier's size in GiB, e.g. kv_offloading_size=4.")
        return
    if isinstance(size, bool) or not isinstance(size, (int, float)) or not size > 0 \
            or size == float("inf"):
        raise ValueError(f"kv_offloading_size must be a positive number of GiB (the host "
                         f"memory for evicted KV blocks, over all ranks), got {size!r}.")
