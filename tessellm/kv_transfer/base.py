"""The KV connector contract: moving KV blocks between an engine's cache and somewhere else
(disk, another engine, an external store), in the spirit of vLLM's ``KVConnectorBase_V1``.

A connector class is built twice per engine: once in the engine core's process with
``KVConnectorRole.SCHEDULER`` (plain Python, no torch: it decides), and once in every worker
with ``KVConnectorRole.WORKER`` (it copies, each rank its own shard of the cache). The two
halves talk only through the per-step metadata the scheduler half builds, which travels inside
``SchedulerOutput.kv_connector_meta`` (plain lists, dicts, strings and ints: it crosses
process boundaries), and through ``ModelRunnerOutput.kv_load_failed`` coming back.

One step (the scheduler, then every worker)::

    scheduler half                                  worker half (every rank)
    admission: device prefix hit, host tier hit,
      get_num_new_matched_tokens -> n external
    allocate blocks (n external count as computed)
    update_state_after_alloc(req, blocks, ...)
    build_connector_meta(step) ------ meta ----->   start_load_kv(meta): files -> blocks
      (+ "check": background loads under way)         (background loads: a loader thread)
                                                    get_finished_loads(meta["check"])
                                                    forward pass
                                                    save_kv(meta): newly full blocks -> files
    update(): a failed load  <-- kv_load_failed --  (request ids whose load failed)
      means the request is recomputed (never wrong tokens)
    finished background loads <-- kv_loads_finished --  (request id -> loaded or failed)
      are admitted (or recomputed)

Invariants
----------
* External tokens are whole blocks that continue the request's device and host-tier hit, and
  never cover its last prompt token (its logits are needed). They count as computed from
  admission on: the blocks are filled before the forward pass of the step that admits it (a
  load in the step), or before the request is first scheduled (a background load, below).
* A load that fails on any rank (missing, corrupt, a mismatched layout) is reported for the
  request; the scheduler then recomputes the request from scratch, without the connector.
  The step's result for it is dropped. A connector never raises into the engine for a cache miss.
* Every load is bounded: one whose store dies under it (a read that hangs, a peer gone, its
  reads cancelled at shutdown) is reported failed within the connector's bound, never left
  under way (a background load nobody reports holds its request and blocks forever).
* ``save_kv`` sees blocks that are full, computed by this step's forward pass (or earlier), and
  whose tokens are all known; each block of a request is offered once (again after its load
  failed: it is recomputed). Blocks a request computed over a failed load (``load_failed``)
  are never saved.
* A background load (``get_num_new_matched_tokens`` -> ``(n, True)``): the request holds its
  blocks from admission on but is not scheduled; the engine asks the worker half about it in
  every step (``meta["check"]``; with nothing else to run, in a poll that waits a moment) and
  admits it, its loaded tokens computed, once every rank reports the copies done. A failure
  frees its blocks and recomputes it from its tokens; other requests never wait for it.
  Once loaded and waiting to run, it gives its blocks back (they stay in the prefix cache)
  before a running request is preempted for blocks.
* A block the worker half still copies out of (``pending_block_reads``) is written by a later
  step only after ``before_writing`` made the device wait for that copy.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

from tessellm.kv_transfer.config import KVTransferConfig


class KVConnectorRole(enum.Enum):
    SCHEDULER = 0
    WORKER = 1


@dataclass
class KVConnectorContext:
    """What the engine tells a connector about its cache; the same for both halves except
    ``rank``."""

    block_size: int  # tokens per KV block
    # Identifies the KV layout: engines with equal namespaces (same model config, dtypes, block
    # size, parallel layout, drafter) hold interchangeable blocks.
    namespace: str
    world_size: int = 1  # ranks, each holding its own part of every block
    rank: int = 0  # this worker's rank (the scheduler half: 0)
    rank_block_bytes: list = field(default_factory=list)  # one block's bytes on each rank

    def to_dict(self) -> dict:
        return {"block_size": self.block_size, "namespace": self.namespace,
                "world_size": self.world_size, "rank": self.rank,
                "rank_block_bytes": list(self.rank_block_bytes)}


@dataclass
class KVConnectorStats:
    """Totals since start (``SchedulerStats.kv_connector``; vLLM's
    ``external_prefix_cache_*`` count these beside the host tier's). Running totals that
    only grow (Prometheus counters are fed their differences).

    Lookups count at every admission that asks the connector (as the device prefix cache's:
    a request preempted, or whose loaded blocks were given back before it ran, is looked up
    again and counts again; one recomputed after a failed load is not asked), so hits never
    exceed queries. A load's hits and blocks count once it is known to have worked (the step
    that loaded it came back without a failure for it, or its background load was reported
    loaded), never counted and taken back. Saves count when the worker half reports them
    done (``record_saves``: written, or found there already; a failed write counts in
    ``save_failures``), not when they are offered: the worker half reports running totals,
    so a report lost or overtaken costs nothing (the next one carries it)."""

    queries: int = 0  # prompt tokens of admissions looked up through the connector
    hits: int = 0  # of which loaded through the connector (a request whose load failed: none)
    blocks_loaded: int = 0  # loaded into the cache for a request that went on to run
    blocks_saved: int = 0  # saves done: the block is in the store (written, or there already)
    save_failures: int = 0  # blocks whose write failed (no file: a later lookup misses)
    load_failures: int = 0  # requests recomputed because a load failed
    lookup_timeouts: int = 0  # admissions whose lookup did not come back in time: computed
    lookups_skipped: int = 0  # admissions not looked up: the store counted as down (computed)
    saves_skipped: int = 0  # blocks not saved: the store counted as down (or hung on them)
    # Requests whose kv_transfer_params named a producer (do_remote_prefill, remote_host and
    # remote_port) that computed their prompt instead: the producer unreachable, of another
    # layout or without the blocks (nothing loaded), or the load from it failed. Once each.
    remote_prefill_fallbacks: int = 0
    # request id -> [hit tokens, blocks] of its loads not yet known to have worked.
    _pending: dict = field(default_factory=dict, repr=False, compare=False)
    # Blocks offered to the worker half, and of those reported settled (done, failed, dropped).
    saves_offered: int = field(default=0, repr=False, compare=False)
    saves_settled: int = field(default=0, repr=False, compare=False)
    # Times the store was marked down: by the scheduler half (its lookups) and, as the worker
    # half reports them, by the workers (their writes).
    downs: int = field(default=0, repr=False, compare=False)
    worker_downs: int = field(default=0, repr=False, compare=False)

    def record_lookup(self, request_id: str, num_tokens: int, num_hit: int) -> None:
        """An admission looked the request up (``num_tokens`` prompt tokens, ``num_hit`` of
        them to load); its hit counts once its load worked."""
        self.queries += num_tokens
        if num_hit:
            self._pending.setdefault(request_id, [0, 0])[0] += num_hit

    def record_load(self, request_id: str, num_blocks: int) -> None:
        """The connector loads ``num_blocks`` blocks for the request (counted once they are in)."""
        if num_blocks:
            self._pending.setdefault(request_id, [0, 0])[1] += num_blocks

    def confirm(self, request_id: str) -> None:
        """The request's loads so far worked (a step ran it, or its background load ended)."""
        if self._pending:
            hits, blocks = self._pending.pop(request_id, (0, 0))
            self.hits += hits
            self.blocks_loaded += blocks

    def record_failed_load(self, request_id: str) -> None:
        """The request's load failed: it is recomputed without the connector, so none of its
        tokens come from the connector."""
        self.load_failures += 1
        self._pending.pop(request_id, None)

    def record_lookup_timeout(self) -> None:
        """A request's lookup did not come back in time (a hung mount, a silent store): it is
        admitted without the connector's blocks and computes its prompt."""
        self.lookup_timeouts += 1

    def record_lookup_skipped(self) -> None:
        """An admission answered without a lookup: the store counts as down (a dead mount, a
        silent peer); the request computes its prompt."""
        self.lookups_skipped += 1

    @property
    def store_down(self) -> int:
        """Times the store was marked down (a lookup timed out, an I/O error of the store's, a
        write hung): the scheduler half's and the worker half's."""
        return self.downs + self.worker_downs

    def record_offered(self, num_blocks: int) -> None:
        """Blocks handed to the worker half to save (counted once it reports them)."""
        self.saves_offered += num_blocks

    def record_saves(self, totals) -> None:
        """The worker half's report (``ModelRunnerOutput.kv_saves``): ``[saved, failed,
        dropped]`` blocks settled since start (dropped: computed over a failed load, never
        saved, neither a save nor a failure), optionally followed by ``skipped`` (not saved:
        the store counted as down) and ``downs`` (times the worker half marked its store
        down). Running totals: an older report changes nothing."""
        saved, failed, dropped = totals[:3]
        skipped = totals[3] if len(totals) > 3 else 0
        if saved + failed + dropped + skipped > self.saves_settled:
            self.blocks_saved, self.save_failures, self.saves_skipped = saved, failed, skipped
            self.saves_settled = saved + failed + dropped + skipped
            if len(totals) > 4:
                self.worker_downs = totals[4]

    @property
    def saves_in_flight(self) -> int:
        """Blocks offered to the worker half and not yet reported settled."""
        return max(0, self.saves_offered - self.saves_settled)

    def request_finished(self, request_id: str) -> None:
        """The request ended (a load it never ran after, e.g. aborted while loading, counts
        nothing)."""
        self._pending.pop(request_id, None)

    def as_dict(self) -> dict:
        return dict(queries=self.queries, hits=self.hits, blocks_loaded=self.blocks_loaded,
                    blocks_saved=self.blocks_saved, save_failures=self.save_failures,
                    load_failures=self.load_failures, lookup_timeouts=self.lookup_timeouts,
                    store_down=self.store_down, lookups_skipped=self.lookups_skipped,
                    saves_skipped=self.saves_skipped,
                    remote_prefill_fallbacks=self.remote_prefill_fallbacks)


class KVConnectorBase:
    """Subclass this and register it (``tessellm.kv_transfer.registry``). Every method has a
    do-nothing default, so a connector implements only what it uses."""

    def __init__(self, config: KVTransferConfig, role: KVConnectorRole, context: KVConnectorContext):
        self.config = config
        self.role = role
        self.context = context
        self.stats = KVConnectorStats()

    # -- scheduler half (the engine core's process; plain Python) --------------------------

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """Tokens after the first ``num_computed_tokens`` (the device and host-tier hit, a
        multiple of the block size) that this connector can load for a request being admitted:
        a multiple of the block size, leaving the last prompt token out. Called at every
        admission attempt (a request may wait for blocks and be asked again); must not change
        state a later call depends on. It runs in the scheduler's step: it must not wait for
        a disk or a network. A count it cannot give yet (a lookup under way off the step) is
        None, or ``(None, False)`` (vLLM's contract): the request stays in its place in the
        queue, others go ahead, and it is asked again at the next admission attempt; with
        nothing else to run the engine calls ``wait_for_lookups``.

        Returns the count, or ``(count, load_async)``: with ``load_async`` the load runs in the
        background (vLLM's ``WAITING_FOR_REMOTE_KVS``): the request gets its blocks and waits,
        without running, while other requests keep running, until the worker half's
        ``get_finished_loads`` reports its load; a plain count (or False) loads it in the step
        that admits it, before that step's forward."""
        return 0

    def update_state_after_alloc(self, request, block_ids: list, first_block: int,
                                 num_blocks: int) -> None:
        """The request got its blocks (``block_ids``: all it holds); its blocks
        ``first_block .. first_block + num_blocks - 1`` are to be loaded externally before the
        next step's forward (``num_blocks`` may be 0: nothing to load, but the request runs)."""

    def build_connector_meta(self, scheduler_output, requests: dict,
                             block_ids: Callable[[str], list]) -> Optional[dict]:
        """The metadata of the step about to be sent (``SchedulerOutput``, not empty), for the
        worker half; ``requests``: request id -> ``Request`` of the scheduler; ``block_ids(rid)``:
        the blocks a request holds, in order. None: nothing for the workers this step."""
        return None

    def wait_for_lookups(self, timeout: float) -> None:
        """Nothing else to run while lookups are under way (``get_num_new_matched_tokens``
        returned None): return once one is done, or after ``timeout`` seconds. This default
        sleeps a millisecond (the engine asks again then), so a connector that answers None
        without overriding it never spins the engine's thread."""
        time.sleep(min(timeout, 0.001))

    def request_failed_load(self, request) -> None:
        """A worker reported the request's load failed; it is being recomputed."""

    def request_finished(self, request) -> Optional[dict]:
        """The request ended (finished or aborted; ``request.status`` says which): drop its
        state. Returns the ``kv_transfer_params`` its final output carries
        (``RequestOutput.kv_transfer_params``, the OpenAI response's field; vLLM's second
        return value), or None: a producer hands back where a decode engine finds the blocks
        of a ``do_remote_decode`` request (``kv_transfer/params.py``). Plain data: it crosses
        processes."""
        return None

    def allowed_producers(self) -> Optional[list]:
        """The producers a request's ``kv_transfer_params`` may name (``"host"`` or
        ``"host:port"`` entries: ``params.producer_allowed``), which the front end holds
        requests to (``EngineInfo.kv_producers``: one 400 for another); None: any, or a
        connector that fetches from no producer a request names."""
        return None

    # -- worker half (each rank's process) -------------------------------------------------

    def register_kv_caches(self, caches: list, swap_blocks: Callable, synchronize: Callable,
                           device) -> None:
        """This rank's cache tensors (block-major: dim 0 the block; keys and values of every
        attention layer in order), the backend's ``swap_blocks(src, dst, mapping)`` and
        ``synchronize()`` (waits for the device's queued work), and the device. Called again,
        with new tensors of the same layout, after sleep mode allocated the cache anew (its
        saves were waited for with ``wait_for_save`` before the old cache went)."""

    def release_kv_caches(self) -> None:
        """Sleep mode frees the cache (after ``wait_for_save``; the engine is idle: no load
        under way): every reference to the tensors ``register_kv_caches`` gave is dropped here,
        or their device memory stays taken while the engine sleeps. ``register_kv_caches``
        gives the new ones at wake."""

    def start_load_kv(self, meta: dict) -> list:
        """Fill the step's loaded blocks before its forward pass, and start its background
        loads. Returns the ids of the requests whose (step) load failed on this rank (their
        blocks may hold anything). Under tensor parallelism the ranks agree on the failures
        when ``meta["loads"]`` lists the step's loads, each item starting with its request id
        (one all-reduce in such steps)."""
        return []

    def load_failed(self, request_ids: list) -> None:
        """The requests whose step load (``start_load_kv``) failed in this step on some rank:
        every rank is told the same list, after ``start_load_kv`` and before ``save_kv``. What
        the device computes for them in this step, and in steps scheduled before the scheduler
        learns of the failure, is computed over blocks holding anything: a connector that
        saves must not save it (the request is recomputed, and saves its blocks then)."""

    def get_finished_loads(self, request_ids: list, timeout: float = 0.0) -> dict:
        """Of ``request_ids`` (the background loads the scheduler still waits for: the engine
        puts them in ``meta["check"]`` of every step while there are any, and calls this after
        ``start_load_kv``), those finished on this rank: request id -> True (its blocks are in
        the cache: copies done, the device reads them in the next step) or False (failed: the
        request is recomputed). Waits up to ``timeout`` seconds for one when none has finished
        (the engine has nothing else to run). Until a load is reported, its blocks are neither
        freed nor reused, even if the request is aborted. Under tensor parallelism a load
        counts as finished when every rank reports it (one all-reduce in steps that check)."""
        return {}

    def save_kv(self, meta: dict):
        """After the step's forward pass was queued: save the blocks the metadata names.
        Returns None (nothing for the step's outputs to wait for: saved, or written behind
        later steps) or a future whose ``result()`` returns once the saves are durable: the
        worker waits for it before the step's outputs leave it (a connector returns one where a
        response must mean saved blocks, e.g. a disaggregated-prefill producer); the host
        launches the next step meanwhile. Blocks not copied out by the time this returns
        must be copied by work queued behind the forward pass (the scheduler may reuse them)."""
        return None

    def pending_block_reads(self) -> bool:
        """Whether copies out of the cache (saves on a stream of the connector's own) may still
        be reading blocks; then the engine calls ``before_writing`` before each step."""
        return False

    def before_writing(self, block_ids: set) -> None:
        """The step about to be launched may write these blocks (every block of its new
        requests, the blocks appended to its running ones): make the device wait (not the
        host) for the copies still reading any of them. A block is written only after it was
        freed and given out again, so a copy queued behind the forward that filled it races
        only with such a step."""

    def wait_for_save(self) -> None:
        """Return once every save handed to ``save_kv`` so far is durable (visible to a reader)."""

    def save_totals(self, timeout: float = 0.0) -> Optional[list]:
        """The saves settled since start, ``[saved, failed, dropped]`` blocks (saved: written,
        or found there already; dropped: computed over a failed load, never saved), optionally
        followed by ``skipped`` blocks (not saved: the store counted as down) and ``downs``
        (times this half marked its store down), or None (none yet). The engine asks as each step is launched, after a step whose outputs
        waited for its saves, and, with nothing else to run while saves offered by the
        scheduler half are unsettled, with ``timeout`` (seconds to wait for those in flight).
        Only a connector whose scheduler half counts its offers (``stats.record_offered``)
        must report them: the engine keeps polling until each offered block is reported."""
        return None

    def shutdown(self) -> None:
        """The engine stops."""
