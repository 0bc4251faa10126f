"""Prefix caching for models with a per-request recurrent state (Mamba2 mixers, gated DeltaNet):
state snapshots at block boundaries, kept beside the cached KV blocks. Plain Python, no torch.

Such a model's recurrent state after ``n`` tokens summarizes all ``n``; it cannot be rebuilt
from KV blocks. So, as vLLM's "align" mode, the engine keeps copies of the state at block
boundaries and a prefix hit may only end where a copy exists::

    block_size 4, prompt of 11 tokens (the last full boundary a hit may end at: 8)
    tokens:    t0 t1 t2 t3 | t4 t5 t6 t7 | t8 t9 t10
    step 1:    [ t0 .. t10, the state after t7 saved inside the step          ]
    blocks:    [   b3 (h0)  ] [   b9 (h1) ] [ b4 ]
    snapshots:                 s2 = state after t7, kept on b9 (``Block.state_slot``)

    a later prompt t0 .. t7 u8 ..: KV hit on b3, b9 and its state copied from s2 into the
    request's own state slot; prefill resumes at u8.

Invariants
----------
* Saves inside a prefill step (``StateSnapshots.within``, the default): a prefill chunk
  saves the state at the boundaries inside it worth a snapshot (``saves_within``: the last
  boundary a hit may end at, ``(num_tokens - 1) // block_size * block_size`` since a hit never
  covers the last prompt token; where the request's cached KV blocks end past its snapshot
  hit, ``BlockManager.state_cut``; with ``every``, each multiple of ``every`` blocks), and at
  its own end when that is such a boundary (``saves_at``). The scheduler takes a snapshot
  slot (``StateSnapshots.take``) for the block that ends at each and names it in
  ``SchedulerOutput.state_saves_within`` (inside) or ``state_saves`` (the chunk's end); the
  layers keep the inner ones while the step runs (``MambaBatch.state_saves``: the Triton
  conv and scans store the states in their one pass, plugin API 23 / 21 / 22, other ops'
  conv states are copied from the conv's input and their scans run once per piece between them,
  ``backends/reference/state_saves.py``), the runner
  copies the request's state into the end's after the step's forward. So a chunk never
  stops early to save: a cached prompt's rest is one step, not one up to its last full block
  and one for the tail.
* Without it (``within`` False, the older scheduling): a prefill chunk ends on a block
  boundary whenever it can (``align_chunk``): a chunk that stops before the request's known
  tokens end is rounded down to a boundary, and the chunk that would reach the end stops
  first at the last boundary a hit may end at; that tail then runs in the next step. A chunk
  ending on a boundary saves the state there (``state_saves``).
* A snapshot belongs to one block (``Block.state_slot``): pending until the block is
  published in the prefix cache (its step came back), then in the pool's LRU. It leaves with
  its block (the block is evicted, or freed unpublished) or, when the pool is full, the least
  recently used published snapshot is taken for a new save (its block stays cached: a later
  block of the chain may still carry a snapshot).
* A prefix hit is cut back to the last hit block that carries a snapshot
  (``BlockManager.find_cached_prefix``); ``SchedulerOutput.state_restores`` names it, and the
  runner copies it into the request's state slot before the step's forward. Restores of a
  step come before its saves on the device, and a snapshot is only read in a step scheduled
  after the step that wrote it came back, so a slot taken over for a new save is never read
  half-written.
* A new request whose cached KV blocks run past its snapshot hit (another prompt shares more
  of its prefix than that prompt kept a state for, e.g. a common system prompt) saves the
  state where those blocks end (``BlockManager.state_cut``; inside its first chunk, or, in the
  older scheduling, ending that chunk there): the next request sharing that prefix hits all
  of it::

      A = S + a (no hit; its state kept after its last full block, past S)
      B = S + b: KV hit on S's blocks, no snapshot in them -> chunk 1 ends at S's last full
          block and saves there (the snapshot goes to A's cached block)
      C = S + c: hit on S's blocks, starting from B's snapshot

  With ``every`` (``recurrent_state_snapshot_interval``, blocks) a prefill also saves at every
  multiple of ``every`` blocks, so B already hits S up to its last such multiple (inside the
  step; in the older scheduling a chunk stops there, one step per ``every`` blocks).
* A decode step that fills a block saves the state there too, replacing the request's previous
  decode snapshot (a request keeps one: its latest boundary), so a next chat turn (this
  request's tokens, then more) hits through the answer. Such a save only takes a free slot,
  and its snapshot is the first given up until a hit uses it.
* Under speculative decoding a decoding step's tokens may be drafts, and a step ahead (async
  scheduling) starts where only the runner knows: such a step reserves a slot at *each*
  boundary it may cross (``SchedulerOutput.state_saves_if_accepted``, from the request's
  computed tokens, not before its last known token, to the step's furthest token; a step in
  flight that listed the same boundary shares the slot). The runner copies the state after
  token ``n - 1`` where its step computed it: a verify step keeps each token's state in a spare
  slot (``core/mamba_state.py``), so a boundary in the middle of its ``k + 1`` tokens is served::

      block_size 4, 9 computed, verify [t9 d0 d1 d2] (tokens 9 .. 12): boundary 12 is the
      state after d1 (token 11, spare 2): kept if d0 and d1 are accepted, else given back
      and listed again by the next step, which starts at token <= 11

  ``BlockManager.settle_state_saves`` (in ``update``, before any block is published) keeps a
  save only when the step computed and kept token ``n - 1`` (the latest becomes the request's
  rolling decode snapshot); one no step in flight may still compute is given back. So no
  snapshot past a rejected draft is ever published.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Optional


class StateSnapshots:
    """``num_slots`` snapshot slots of the runner's snapshot pool (``MambaStateCache``'s
    ``snapshots``): which block holds each, least recently used first."""

    def __init__(self, num_slots: int, every: int = 0):
        if num_slots < 1:
            raise ValueError(f"A recurrent-state snapshot pool needs >= 1 slot, got {num_slots}.")
        self.num_slots = num_slots
        self.every = every  # recurrent_state_snapshot_interval: blocks between prefill saves
        # Saves inside a prefill step (``saves_within``): a chunk need not stop at a boundary to
        # save there. False: the older scheduling, a chunk cut at each boundary it saves at
        # (kept for the scheduler's tests and as a fallback; no setting turns it on).
        self.within = True
        self.free = list(range(num_slots - 1, -1, -1))  # pop() gives the lowest first
        self.published: OrderedDict[int, object] = OrderedDict()  # slot -> Block, LRU first
        # Snapshots saved (for stats and tests): a prefill or decode save when its slot is taken,
        # a speculating step's once a step kept it (settle_state_saves). Only grows: the
        # metrics feed a Prometheus counter its differences.
        self.num_saved = 0
        self.num_restored = 0  # prefix hits that started from a snapshot
        self.num_evicted = 0  # published snapshots given up (taken over, or left with their block)
        # Pending saves of speculating requests (``state_saves_if_accepted``): slot -> the
        # steps in flight that list it; a slot leaves once a step kept its boundary.
        self.if_accepted: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free)

    def stats_dict(self) -> dict:
        """For the metrics (``tessellm:recurrent_state_snapshot*``, docs/metrics.md): the pool's
        ``slots``, those ``used`` (pending or published), and totals since start: ``saves``
        (snapshots saved: a speculating step's once kept), ``restores`` (hits started from a
        snapshot), ``evictions``."""
        return dict(slots=self.num_slots, used=self.num_slots - len(self.free),
                    saves=self.num_saved, restores=self.num_restored, evictions=self.num_evicted)

    def take(self, evict: bool = True, count: bool = True) -> Optional[int]:
        """A slot for a new save: a free one, else (``evict``) the least recently used published
        snapshot's (taken off its block); None when there is none (the save is skipped).
        ``count``: the save counts now (a speculating step's counts once kept)."""
        if self.free:
            slot = self.free.pop()
        elif self.published and evict:
            slot, block = self.published.popitem(last=False)
            block.state_slot = None
            self.num_evicted += 1
        else:
            return None
        if count:
            self.num_saved += 1
        return slot

    def publish(self, block, first_to_go: bool = False) -> None:
        """``block`` was published in the prefix cache: its pending snapshot may serve hits.
        ``first_to_go``: a decode step's snapshot, given up before any other until a hit uses it."""
        self.published[block.state_slot] = block
        if first_to_go:
            self.published.move_to_end(block.state_slot, last=False)

    def touch(self, block) -> None:
        """A hit restored ``block``'s snapshot: most recently used now."""
        self.published.move_to_end(block.state_slot)
        self.num_restored += 1

    def release(self, block) -> None:
        """``block`` leaves the cache (evicted, or freed before it was published): its slot is free."""
        slot = block.state_slot
        if slot is None:
            return
        block.state_slot = None
        self.if_accepted.pop(slot, None)
        if self.published.pop(slot, None) is not None:
            self.num_evicted += 1
        self.free.append(slot)

    def cancel(self, block) -> None:
        """``block``'s pending save is not kept (a save past a rejected draft, or an earlier
        boundary of the same step): its slot is free again (the save was never counted)."""
        self.release(block)

    def clear(self, blocks) -> None:
        for block in blocks:
            block.state_slot = None
        self.published.clear()
        self.if_accepted.clear()
        self.free = list(range(self.num_slots - 1, -1, -1))


def align_chunk(start: int, num_new: int, num_tokens: int, block_size: int, every: int = 0) -> int:
    """``num_new`` tokens from ``start`` cut so the chunk ends on a block boundary where it can
    (module docstring): before the known tokens' end, rounded down to a boundary (unless that
    leaves nothing); reaching the end, first up to the last boundary a hit may end at. With
    ``every`` (blocks), first at the next multiple of ``every`` blocks a hit may end at."""
    if every:
        step = every * block_size
        stop = (start // step + 1) * step
        if start + num_new > stop and stop <= (num_tokens - 1) // block_size * block_size:
            return stop - start
    end = start + num_new
    if end >= num_tokens:
        last = (num_tokens - 1) // block_size * block_size
        return last - start if start < last else num_new
    aligned = end // block_size * block_size
    return aligned - start if aligned > start else num_new


def saves_within(start: int, num_new: int, num_tokens: int, block_size: int, every: int = 0,
                 cut: int = 0) -> list[int]:
    """The block boundaries strictly inside the chunk of ``num_new`` tokens from ``start`` whose
    state is worth a snapshot, saved inside the step (``SchedulerOutput.state_saves_within``):
    the last boundary a hit may end at, ``cut`` (where the request's cached KV blocks end
    past its snapshot hit: ``BlockManager.state_cut``) and, with ``every`` (blocks), each
    multiple of ``every`` blocks a hit may end at. The chunk's end is ``saves_at``'s."""
    end = start + num_new
    last = (num_tokens - 1) // block_size * block_size
    marks = {last, cut}
    if every:
        step = every * block_size
        marks.update(range((start // step + 1) * step, min(end, last + 1), step))
    return sorted(n for n in marks if start < n < end and n <= last and n % block_size == 0)


def saves_at(start: int, num_new: int, num_tokens: int, block_size: int) -> Optional[int]:
    """The index of the block whose end this chunk reaches, when its state there is worth a
    snapshot (a boundary a later hit may end at); else None."""
    end = start + num_new
    if end % block_size or end > (num_tokens - 1) // block_size * block_size or end <= start:
        return None
    return end // block_size - 1
