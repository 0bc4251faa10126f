"""KV cache block manager: fixed-size blocks, reference counts, a free queue, prefix caching.

Plain Python: block ids and token counts, never tensors.

Invariants
----------
* Every block is in exactly one of: held by >= 1 request (``ref_cnt > 0``), or in the free
  queue (``ref_cnt == 0``). A free block may still hold a cached prefix (``block_hash`` set)
  and be revived by a prefix hit until it is evicted.
* The free queue is ordered least-recently-freed first. Allocation takes from the front and
  evicts the cached hash of whatever it takes. A request's blocks are freed tail first, so a
  prompt's *last* blocks are evicted before its first ones (the first are the most shareable).
* A full block's hash chains its parent's hash and its own token ids (plus an extra key such as
  a cache salt, a LoRA adapter id, the images whose placeholders the block covers:
  ``Request.block_key``): ``h_i = H(h_{i-1}, tokens_i, extra)``. Equal prefixes share blocks.
  ``H`` is a 128-bit BLAKE2b (``hash_block``), not Python's ``hash()``: a tuple hash of small
  ints can be inverted with ~2^32 work, so one tenant could craft a block whose hash equals a
  known prompt's and have another tenant's request read its KV (vLLM's CVE-2025-25183); it is
  also the same in every process.
* A prefix hit never covers a request's last prompt token: that token's logits are needed.
* With a host tier (``host``, ``core/kv_offload.py``), a cached block evicted here is stored
  there first, and a prefix that misses here but hits there is loaded into fresh blocks, which
  take the hash here at once (so a later request of the same step shares them).
* With recurrent-state snapshots (``states``, models with Mamba / gated DeltaNet layers:
  ``core/state_prefix.py``), a block may carry the snapshot of the state after its last token
  (``Block.state_slot``); a hit is cut back to the last block that carries one, and a snapshot
  leaves with its block.

Picture of one request (block_size 4, 10 tokens, 9 computed)::

    tokens:  t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9
    blocks:  [  b7 full ] [  b2 full ] [ b5 partial ]
    hashes:      h0           h1          (none until full)
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass
from typing import Optional

from tessellm.core.cache_view import CacheEvents
from tessellm.core.kv_offload import HostKVTier
from tessellm.core.request import Request
from tessellm.core.state_prefix import StateSnapshots
from tessellm.metrics.kv_residency import KVResidency


@dataclass
class Block:
    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[int] = None  # set once full and registered in the prefix cache
    # Recurrent-state models: the snapshot slot holding the state after this block's last
    # token (core/state_prefix.py); None: no snapshot.
    state_slot: Optional[int] = None


@dataclass
class PrefixCacheStats:
    queries: int = 0  # prompt tokens looked up
    hits: int = 0  # of which found in the cache

    def record(self, num_queried: int, num_hit: int) -> None:
        self.queries += num_queried
        self.hits += num_hit

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


def hash_block(parent_hash: Optional[int], token_ids: tuple[int, ...], extra: object = None) -> int:
    """A block's prefix hash (module docstring): BLAKE2b-128 over its parent's hash, its token
    ids and ``repr(extra)`` (None, strings, ints and tuples of them), as an int."""
    h = hashlib.blake2b(digest_size=16)
    h.update(b"-" if parent_hash is None else parent_hash.to_bytes(16, "little"))
    h.update(len(token_ids).to_bytes(4, "little") + array("q", token_ids).tobytes())
    if extra is not None:
        h.update(repr(extra).encode())
    return int.from_bytes(h.digest(), "little")


def iter_block_hashes(token_ids, block_size: int, block_key, parent: Optional[int] = None, start: int = 0):
    """The hashes of the full blocks of ``token_ids`` from block ``start`` on (``parent``: the
    hash of block ``start - 1``), one by one; ``block_key(start, end)`` is the extra key of the
    block over those tokens (``Request.block_key``). The data-parallel front end hashes prompts
    with it too (``load_balance.iter_request_block_hashes``): the same hashes as the cores'."""
    bs = block_size
    for i in range(start, len(token_ids) // bs):
        parent = hash_block(parent, tuple(token_ids[i * bs:(i + 1) * bs]), block_key(i * bs, (i + 1) * bs))
        yield parent


def extend_block_hashes(hashes: list[int], token_ids, block_size: int, block_key) -> list[int]:
    """Extend ``hashes`` (a request's, or a prefix of them) to every full block of
    ``token_ids`` (``iter_block_hashes``)."""
    hashes.extend(iter_block_hashes(token_ids, block_size, block_key, hashes[-1] if hashes else None, len(hashes)))
    return hashes


class BlockManager:
    """Allocates KV blocks to requests. One instance per engine (all layers share block ids)."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}.")
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # block_id -> Block, least recently freed first. OrderedDict gives O(1) removal.
        self.free_queue: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self.cached: dict[int, Block] = {}  # block hash -> block holding that prefix
        self.req_blocks: dict[str, list[Block]] = {}
        self.stats = PrefixCacheStats()
        self.host: Optional[HostKVTier] = None  # the host tier (--kv-offloading-size), or None
        # Recurrent-state snapshots at block boundaries (core/state_prefix.py), or None.
        self.states: Optional[StateSnapshots] = None
        self.rolling: dict[str, Block] = {}  # request id -> the block of its latest decode save
        # Data parallelism: the hashes entering and leaving ``cached``, for the front end's
        # balancer (core/cache_view.py); None: not recorded.
        self.events: Optional[CacheEvents] = None
        # Sampled block residency (--kv-cache-metrics; tessellm/metrics/kv_residency.py), or None.
        self.residency: Optional[KVResidency] = None

    # -- queries ---------------------------------------------------------------------------

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        """Fraction of blocks held by requests (cached-but-free blocks count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix cache ----------------------------------------------------------------------

    def update_block_hashes(self, request: Request) -> None:
        """Extend ``request.block_hashes`` to cover every full block of its known tokens."""
        extend_block_hashes(request.block_hashes, request.all_token_ids, self.block_size, request.block_key)

    def find_cached_prefix(self, request: Request, count: bool = True) -> list[Block]:
        """The longest run of cached blocks matching the request's prompt prefix.

        Leaves at least one prompt token uncomputed. Counts the lookup in ``stats`` unless
        ``count`` is False: the scheduler counts a request once, when it is admitted, not at
        every step it is retried while the cache is full.
        """
        if not self.enable_prefix_caching:
            return []
        self.update_block_hashes(request)
        max_blocks = (request.num_tokens - 1) // self.block_size
        hit: list[Block] = []
        for block_hash in request.block_hashes[:max_blocks]:
            block = self.cached.get(block_hash)
            if block is None:
                break
            hit.append(block)
        if self.states is not None:  # a hit ends where a recurrent-state snapshot is kept
            while hit and hit[-1].state_slot is None:
                hit.pop()
        if count:
            self.stats.record(request.num_tokens, len(hit) * self.block_size)
        return hit

    def num_recomputed(self, request: Request, num_hit: int) -> int:
        """Prompt tokens the prefix cache holds that a request computes anyway: a prompt that
        fills its last block, every block before it a hit (``num_hit`` tokens), leaves that
        block out of its hit (its last token must be computed for the logits), so a cached last
        block is computed again: ``block_size`` tokens, else 0. One lookup per admission."""
        bs, n = self.block_size, request.num_tokens
        if not self.enable_prefix_caching or n % bs or num_hit != n - bs or len(request.block_hashes) < n // bs:
            return 0
        return bs if request.block_hashes[n // bs - 1] in self.cached else 0

    def state_cut(self, request: Request, num_hit_blocks: int) -> int:
        """With state snapshots: where the request's cached KV blocks end (in tokens) when
        they run past its hit of ``num_hit_blocks`` (cut back to a snapshot), else 0. Its
        first chunk should end there, so that prefix (another prompt's, as far as this one
        shares it) gains a snapshot for the next request sharing it (core/state_prefix.py)."""
        if self.states is None or not self.enable_prefix_caching:
            return 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        n = num_hit_blocks
        while n < max_blocks and request.block_hashes[n] in self.cached:
            n += 1
        return n * self.block_size if n > num_hit_blocks else 0

    def find_offloaded(self, request: Request, num_hit_blocks: int) -> list[int]:
        """The hashes that continue a device hit of ``num_hit_blocks`` blocks from the host
        tier (same limit: the last prompt token is never a hit). Empty without a host tier."""
        if self.host is None or not self.enable_prefix_caching:
            return []
        max_blocks = (request.num_tokens - 1) // self.block_size
        return self.host.match(request.block_hashes[num_hit_blocks:max_blocks])

    def publish_full_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Register the request's blocks that are full and computed in the prefix cache.

        Resumes from ``request.num_published_blocks``, so each block is looked at once.
        """
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        if num_full <= request.num_published_blocks:
            return
        self.update_block_hashes(request)
        blocks = self.req_blocks.get(request.request_id, [])
        num_full = min(num_full, len(request.block_hashes), len(blocks))
        for i in range(request.num_published_blocks, num_full):
            block = blocks[i]
            if block.block_hash is not None:
                continue
            if self.states is not None and block.state_slot in self.states.if_accepted:
                # a save a step still in flight listed, computed before it (that step starts
                # after it): never written, and no step kept it (settle_state_saves ran first)
                self.states.cancel(block)
            block_hash = request.block_hashes[i]
            if block_hash in self.cached:
                # another block already holds this prefix; keep ours private (its snapshot
                # goes to that block when it has none)
                self._hand_over_state(block, self.cached[block_hash])
                continue
            block.block_hash = block_hash
            self.cached[block_hash] = block
            if self.events is not None:
                self.events.stored(block_hash)
            if block.state_slot is not None:
                self.states.publish(block, self.rolling.get(request.request_id) is block)
        request.num_published_blocks = max(request.num_published_blocks, num_full)

    def _hand_over_state(self, ours: Block, cached: Block) -> None:
        if ours.state_slot is None:
            return
        if cached.state_slot is None:
            cached.state_slot, ours.state_slot = ours.state_slot, None
            self.states.publish(cached)
        else:
            self.states.release(ours)

    def reserve_state_save(self, request: Request, block_index: int,
                           rolling: bool = False) -> Optional[int]:
        """A snapshot slot for the state after block ``block_index`` of ``request`` (the step
        being scheduled ends there); None when the pool has none to give or the block has one.
        ``rolling``: a decode step's save, which replaces the request's previous decode save
        (a request keeps one: its latest boundary, for the next chat turn)."""
        blocks = self.req_blocks.get(request.request_id, [])
        if self.states is None or block_index >= len(blocks):
            return None
        block = blocks[block_index]
        if block.state_slot is not None or block.block_hash is not None:
            return None
        if rolling:
            previous = self.rolling.pop(request.request_id, None)
            if previous is not None:
                self.states.release(previous)
        block.state_slot = self.states.take(evict=not rolling)
        if rolling and block.state_slot is not None:
            self.rolling[request.request_id] = block
        return block.state_slot

    def reserve_save_if_accepted(self, request: Request, block_index: int) -> Optional[int]:
        """A snapshot slot for the state after block ``block_index`` of ``request``, which the
        step being scheduled may compute (speculative decoding: its last token may be a draft,
        and a step ahead may start earlier than scheduled). The step lists it in
        ``state_saves_if_accepted``; a step still in flight that listed the same block shares
        its slot. None when the pool has no free slot or the block holds another snapshot."""
        blocks = self.req_blocks.get(request.request_id, [])
        if self.states is None or block_index >= len(blocks):
            return None
        block = blocks[block_index]
        if block.block_hash is not None:
            return None
        pending = self.states.if_accepted
        if block.state_slot is None:
            block.state_slot = self.states.take(evict=False, count=False)  # counted once kept
            if block.state_slot is None:
                return None
        elif block.state_slot not in pending:
            return None  # a prefill chunk's save, or one already kept
        pending[block.state_slot] = pending.get(block.state_slot, 0) + 1
        return block.state_slot

    def settle_state_saves(self, request: Request, saves: list, start: int, end: int) -> None:
        """A step's ``state_saves_if_accepted`` for ``request`` (``[[n, slot], ...]``) once it
        is known that it computed and kept tokens ``start .. end - 1``. A save with
        ``start < n <= end`` holds the state after the accepted block ending at ``n`` (the
        runner copied it from that token's state): the latest such becomes the request's
        rolling decode save, replacing the previous one. A save this step did not keep is
        given up unless a step still in flight listed it too; none is ever published with a
        state past a rejected draft, which no prefix ever had."""
        blocks = self.req_blocks.get(request.request_id, [])
        pending = self.states.if_accepted
        latest = None
        for n, slot in saves:
            i = n // self.block_size - 1
            block = blocks[i] if i < len(blocks) else None
            if block is None or block.state_slot != slot or slot not in pending:
                continue  # its block left with the slot, or an earlier step kept it
            if start < n <= end:
                del pending[slot]
                if latest is not None:
                    self.states.cancel(latest)
                latest = block
            elif pending[slot] > 1:
                pending[slot] -= 1  # a step in flight may still compute it
            else:
                self.states.cancel(block)
        if latest is not None:
            self.states.num_saved += 1  # one kept (the earlier boundaries of the step given up)
            previous = self.rolling.pop(request.request_id, None)
            if previous is not None and previous is not latest:
                self.states.release(previous)
            self.rolling[request.request_id] = latest

    # -- allocation ------------------------------------------------------------------------

    def can_allocate(self, request: Request, num_new_tokens: int, prefix: list[Block],
                     offloaded: list[int] = ()) -> bool:
        held = len(self.req_blocks.get(request.request_id, ())) + len(prefix)
        cached = (len(prefix) + len(offloaded)) * self.block_size
        needed = self.blocks_needed(request.num_computed_tokens + cached + num_new_tokens) - held
        revived = sum(1 for b in prefix if b.ref_cnt == 0)  # leave the free queue when taken
        return needed + revived <= self.num_free_blocks

    def allocate(self, request: Request, num_new_tokens: int,
                 prefix: Optional[list[Block]] = None,
                 offloaded: Optional[list[int]] = None) -> Optional[list[int]]:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens after its computed ones.

        ``prefix``: cached blocks from ``find_cached_prefix`` to take first (new requests only);
        ``offloaded``: the hashes after them that ``find_offloaded`` found in the host tier,
        loaded into fresh blocks that come next. The tokens of both count as computed.
        Returns the ids of the blocks added (prefix included), or None when there are not enough
        free blocks (nothing is changed then).
        """
        prefix, offloaded = prefix or [], offloaded or []
        if not self.can_allocate(request, num_new_tokens, prefix, offloaded):
            return None
        held = self.req_blocks.setdefault(request.request_id, [])
        for block in prefix:
            if block.ref_cnt == 0:
                del self.free_queue[block.block_id]
            block.ref_cnt += 1
            held.append(block)
        if self.residency is not None:
            for block in prefix:
                self.residency.hit(block.block_id)
        loaded = self._load_offloaded(offloaded) if offloaded else []
        held.extend(loaded)
        total = (request.num_computed_tokens + (len(prefix) + len(loaded)) * self.block_size
                 + num_new_tokens)
        new = [self._take_free_block() for _ in range(self.blocks_needed(total) - len(held))]
        held.extend(new)
        return [b.block_id for b in prefix] + [b.block_id for b in loaded] + [b.block_id for b in new]

    def _load_offloaded(self, hashes: list[int]) -> list[Block]:
        """Fresh blocks for ``hashes`` with their contents loaded from the host tier; each
        takes its hash in the device cache now (its tokens count as computed)."""
        self.host.hold(hashes)  # evictions below store into the tier: never over these
        blocks = []
        for block_hash in hashes:
            block = self._take_free_block()
            self.host.load(block_hash, block.block_id)
            block.block_hash = block_hash
            self.cached[block_hash] = block
            if self.events is not None:
                self.events.stored(block_hash)
            blocks.append(block)
        self.host.release()
        return blocks

    def reset_prefix_cache(self) -> bool:
        """Forget every cached prefix (the KV contents are gone or stale: sleep mode, new
        weights), the host tier's too. Only while no request holds a block; False (nothing
        done) otherwise."""
        if self.num_free_blocks != self.num_blocks:
            return False
        for block in self.cached.values():
            block.block_hash = None
        if self.states is not None:
            self.states.clear(self.blocks)
        self.cached.clear()
        if self.events is not None:
            self.events.cleared()
        if self.host is not None:
            self.host.clear()
        if self.residency is not None:
            self.residency.reset()
        return True

    def _take_free_block(self) -> Block:
        _, block = self.free_queue.popitem(last=False)
        if self.residency is not None:
            self.residency.taken(block.block_id)
        if self.states is not None:
            self.states.release(block)  # a snapshot leaves with its block
        if block.block_hash is not None:  # evict its cached prefix (to the host tier, if any)
            if self.cached.get(block.block_hash) is block:
                del self.cached[block.block_hash]
                if self.events is not None:
                    self.events.removed(block.block_hash)
                if self.host is not None:
                    self.host.store(block.block_hash, block.block_id)
            block.block_hash = None
        block.ref_cnt = 1
        return block

    def free(self, request: Request) -> None:
        """Release a request's blocks, tail first (so its prefix is evicted last). Blocks it
        published stay in the prefix cache until evicted; the request publishes afresh if it
        comes back (after a preemption)."""
        request.num_published_blocks = 0
        self.rolling.pop(request.request_id, None)  # its last decode save stays with its block
        for block in reversed(self.req_blocks.pop(request.request_id, [])):
            self._release(block)

    def truncate(self, request: Request, num_tokens: int) -> list[int]:
        """Keep the request's slots for its first ``num_tokens`` tokens; free the blocks past
        them (tail first). Returns the freed block ids.

        For rejected draft tokens: their K/V sits in slots past the accepted length, and they
        were never published (only computed, accepted tokens are), so nothing leaves the prefix
        cache. A published block is never cut (other requests may share it)::

            block_size 4, accepted 6 of 10 computed:
            slots:  [a0 a1 a2 a3] [a4 a5 r6 r7] [r8 r9 .. ..]
            kept:   [  block 0  ] [  block 1  ]  freed: block 2 (r6, r7 are overwritten later)
        """
        if num_tokens < request.num_published_blocks * self.block_size:
            raise ValueError(f"Cannot truncate request {request.request_id!r} to {num_tokens} tokens: "
                             f"its first {request.num_published_blocks * self.block_size} are "
                             "published in the prefix cache (only unaccepted tokens may be cut).")
        held = self.req_blocks.get(request.request_id, [])
        keep = self.blocks_needed(num_tokens)
        freed = held[keep:]
        del held[keep:]
        for block in reversed(freed):
            self._release(block)
        return [b.block_id for b in freed]

    def _release(self, block: Block) -> None:
        block.ref_cnt -= 1
        if block.ref_cnt == 0:
            self.free_queue[block.block_id] = block
            if block.block_hash is None and self.states is not None:
                self.states.release(block)  # never published: its snapshot serves no hit
