"""The shared-storage connector's worker half (one per rank): blocks between this rank's cache
and its files, through staging buffers (``staging.py``) and thread pools.

Threads::

    stepping thread    start_load_kv: in-step loads (read + copied before the forward);
                         background loads handed to the loader
                       save_kv: the step's saves copied into staging buffers (on the
                         connector's own stream, behind the forward), handed to the writer
    tessellm-kv-load   one: a background load at a time, its reads fanned out to the readers
                         (the next chunk's queued before this one's copies: _load), its
                         copies on the connector's own stream, then its status
    tessellm-kv-save   one: a step's saves in order; waits for their copies, fans the files out
                         to the write pool
    tessellm-kv-read   io_threads: files read into a staging buffer (preadv), sum64 checked
    tessellm-kv-write  io_threads: whether a block's file is there already (a stat), else
                         its sum64 and file (writev to a temporary name, renamed)

The stepping thread never touches the file system for a save: whether a block's file exists
is asked on the write pool, after the copy, so a step costs no ``stat`` per block it fills.
Every pool's threads are daemons (``threads.DaemonPool``): one hung on a dead mount never holds
the process at exit.

A dead store (``StoreHealth``): a write (or a file check) under way longer than
``lookup_timeout_ms``, a block's read under way longer than the load bound (``load_timeout``:
``lookup_timeout_ms`` here, the peer's ``timeout_s`` for ZmqPeer), or a write failing with an
error of the store's, marks it down. The
saves queued behind the hung one are given up (counted as skipped, their staging buffers
back as soon as the writer reaches them), the step's saves while it is down are skipped (no
copy, no buffer, no thread), and nothing the step's outputs or the engine's shutdown wait for
waits for a hung write past that bound; after ``store_down_ms`` a probe asks the store again.

Every load is bounded the same way: the thread that waits for a chunk's reads (the loader, or
the stepping thread for a load in the step) looks every ``_POLL_S`` at whether a read of the
store's has hung past ``load_timeout`` (a file that never answers, a peer killed
mid-transfer), whether its reads were cancelled, or whether the connector shuts down; then
the load is given up (``_LoadGivenUp``): it fails, as a missing block does (the request's
blocks are freed and its prompt recomputed), the staging buffers the hung reads may still
write into are never given out again (``Staging.lose``), and nothing is copied into the
request's blocks after that.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait as wait_futures
from typing import Optional

from tessellm.kv_transfer import shared_storage_format as fmt
from tessellm.kv_transfer.staging import (Staging, copies_done, new_stream, torch_module,
                                          wait_event)
from tessellm.kv_transfer.threads import DaemonPool

logger = logging.getLogger(__name__)

# Staging: host buffers of a chunk of blocks each, made once and reused (pinned on a GPU).
_CHUNK_BYTES = 256 << 20  # a chunk's bytes at most (and at least one block) ...
_CHUNK_BLOCKS = 1024  # ... and its blocks at most
_LOAD_BUFFERS = 2  # a chunk's files are read while the one before is copied to the device
_SAVE_BUFFERS = 8  # chunks copied out and not yet written; past that a save waits for the disk
_SAVE_RESERVE = 4  # made at start on a producer (pinned: 1 GiB of 8B-model KV, ~0.5 s)
_FAILED_KEPT = 4096  # request ids of failed loads remembered (a request's steps in flight: few)
_POLL_S = 0.05  # a wait for saves (or a load's reads) looks at whether the store hangs this often
_READERS_EXIT_S = 1.0  # shutdown waits this long at most for reader threads (loads given up)
# A write failing with one of these is the store's failure (marked down), not the block's; a
# full disk (ENOSPC, EDQUOT) is a failed save and the next saves still try.
_DEAD_ERRNOS = {errno.EIO, errno.ESTALE, errno.ENOTCONN, errno.ETIMEDOUT, errno.EHOSTDOWN,
                errno.EHOSTUNREACH, errno.ENODEV, errno.ENXIO, errno.ECONNABORTED,
                errno.ECONNRESET, errno.ECONNREFUSED, errno.ENETDOWN, errno.ENETUNREACH}


def _split_at_source(runs: list, chunk: list) -> list:
    """The reader threads' runs of a chunk, each cut where its items' store (``where``)
    changes: a run reads from one store (a step's loads may come from several producers)."""
    out = []
    for run in runs:
        start = run.start
        for i in range(run.start + 1, run.stop):
            if chunk[i][2] != chunk[i - 1][2]:
                out.append(range(start, i))
                start = i
        out.append(range(start, run.stop))
    return out


class _LoadGivenUp(Exception):
    """A load's reads are not waited for any more (a read hung past the load bound, its reads
    cancelled, the connector shutting down): the load fails."""


class _SaveChunk:
    """A staging chunk's saves on their way to the store: settled once (written or failed by
    the writer, or given up on while the store hangs: ``abandoned``, counted as skipped)."""

    __slots__ = ("n", "settled", "abandoned", "future")

    def __init__(self, n: int):
        self.n, self.settled, self.abandoned, self.future = n, False, False, None


class _LoadChunk:
    """A staging chunk of a load whose reads are under way: from ``lo``, its ``(key, block)``
    pairs, buffer, tensor parts, the reader pool's futures (a list of oks each, in order), and
    ``clock``: when its reads last made progress (a block's read started: ``_reading``)."""

    __slots__ = ("lo", "chunk", "flat", "parts", "futures", "clock")

    def __init__(self, lo, chunk, flat, parts, futures, clock=None):
        self.lo, self.chunk, self.flat, self.parts, self.futures = lo, chunk, flat, parts, futures
        self.clock = clock if clock is not None else [time.monotonic()]


class _StepGate:
    """The step's calls into the worker half (``start_load_kv``, ``save_kv``) against its
    shutdown. A flag alone narrowed the race without closing it: a step that read "open" just
    before shutdown began went on to make a loader or writer pool again after shutdown had
    ended them (threads outliving the connector, files written after the shutdown that waited
    for the saves), or to use a pool already gone. Here a call is admitted only while the
    connector is open and holds its place until it returns; shutdown closes the gate (no call
    is admitted after that: the caller refuses its work) and then waits for the calls inside
    to leave before it ends anything. A load inside gives up at once (``_await_reads`` reads
    ``closing``); a save inside hands its chunks to the writer, whose writes shutdown waits
    for as for any save."""

    def __init__(self):
        self._cond = threading.Condition()
        self._inside = 0
        self.closing = False  # read unlocked by loads under way (a bool: set once, never unset)

    @contextlib.contextmanager
    def enter(self):
        """Yields whether the call is admitted (False: shutdown began; do none of the work)."""
        with self._cond:
            admitted = not self.closing
            self._inside += admitted
        try:
            yield admitted
        finally:
            if admitted:
                with self._cond:
                    self._inside -= 1
                    self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """No call admitted from now on; whether those inside left within ``timeout``."""
        with self._cond:
            self.closing = True
            return self._cond.wait_for(lambda: self._inside == 0, timeout)


class _SavesDone:
    """What a step's outputs wait for (``save_kv`` with ``wait``): every save handed over so
    far written, or the store marked down (a write hung past ``lookup_timeout_ms``: the saves
    left are given up, the outputs go)."""

    def __init__(self, worker, future):
        self.worker, self.future = worker, future

    def result(self, timeout=None):
        self.worker._wait_saves(self.future)

    def done(self) -> bool:
        return self.future.done()


class SharedStorageWorker:
    """The worker half of ``SharedStorageConnector`` (a mixin: ``config``, ``context``,
    ``root``, ``checksum``, ``io_threads`` and ``path`` are the connector's)."""

    def register_kv_caches(self, caches, swap_blocks, synchronize, device) -> None:
        if getattr(self, "_readers", None) is not None:  # the cache allocated anew (sleep mode)
            self.wait_for_save()
            self.caches = caches  # same layout: the rest stays
            return
        torch = torch_module()
        self.caches = caches
        self.swap_blocks = swap_blocks
        self.synchronize = synchronize
        self.nbytes = [t[0].numel() * t.element_size() for t in caches]
        self.block_bytes = sum(self.nbytes)
        self.offsets = [sum(self.nbytes[:i]) for i in range(len(caches))]
        self.layout = fmt.layout_digest(caches)
        self.device = device
        self.pin = device.type not in ("cpu", "xla")
        chunk = max(1, min(_CHUNK_BLOCKS, _CHUNK_BYTES // max(1, self.block_bytes)))
        # Host buffers kept for the engine's life (a fresh 1 GiB pinned buffer costs ~0.5 s of
        # cudaHostAlloc: that, not the files, was most of a slow load), a chunk of blocks each.
        self._load_staging = Staging(chunk, self.block_bytes, _LOAD_BUFFERS, self.pin)
        self._save_staging = Staging(chunk, self.block_bytes, _SAVE_BUFFERS, self.pin)
        if self.pin and self.config.is_consumer:
            self._load_staging.reserve(_LOAD_BUFFERS)  # at start, not in a request's TTFT
        if self.pin and self.config.is_producer:
            self._save_staging.reserve(_SAVE_RESERVE)
        # Streams of its own for the background loads' copies and the saves' (none on the cpu:
        # plain copies): neither waits for the other, nor the forward passes for them.
        self._stream, self._save_stream = new_stream(torch, device), new_stream(torch, device)
        self._readers = DaemonPool(self.io_threads, "tessellm-kv-read")
        self._writers = DaemonPool(self.io_threads, "tessellm-kv-write")
        self._writer = None  # runs each step's saves in order (its writes fan out to _writers)
        self._loader = None  # runs background loads in order (their reads fan out to _readers)
        self._pending: deque = deque()  # _SaveChunks not known written yet, in order
        self._pending_lock = threading.Lock()  # (the step's thread and the outputs' waiter)
        self._abandoned: list = []  # _SaveChunks given up on whose writes had not returned
        self._reads: deque = deque()  # (event, block ids) of saves' copies on the own stream
        # Background loads: request id -> None (under way), True (loaded), False (failed).
        self._load_status: dict = {}
        self._load_cond = threading.Condition()
        # Reads of the store under way on the reader pool: thread -> when its current block's
        # read started (a read older than load_timeout hangs: the load waiting for it fails).
        self._read_since: dict = {}
        self._reader_clock = threading.local()  # a reader thread's chunk's progress clock
        self._gate = _StepGate()  # shutdown against the step's loads and saves
        # Totals of this rank since start (tests, benchmarks): files written, and blocks not
        # written because their file was there already (another engine's, or a recompute's).
        self.files_written = self.files_present = 0
        # Saves settled since start (save_totals): saved (written or there already), failed,
        # dropped (computed over a failed load), skipped (the store down); and the times this
        # half marked its store down.
        self._settled = [0, 0, 0, 0, 0]
        self._settled_lock = threading.Lock()
        # Requests whose step load failed (load_failed), the latest few: saves the scheduler
        # offered for them before it learned of the failure are dropped.
        self._failed_loads: OrderedDict = OrderedDict()

    def load_failed(self, request_ids: list) -> None:
        for rid in request_ids:
            self._failed_loads[rid] = None
            self._failed_loads.move_to_end(rid)
        while len(self._failed_loads) > _FAILED_KEPT:
            self._failed_loads.popitem(last=False)

    def release_kv_caches(self) -> None:
        self.caches = []  # (the staging buffers are host memory: kept for the wake)

    def _views(self, mv, n: int, i: int) -> list:
        """Block ``i``'s part of every cache tensor in a buffer of ``n`` blocks: the payload of
        its file, in order."""
        return [mv[n * o + i * nb:n * o + (i + 1) * nb] for o, nb in zip(self.offsets, self.nbytes)]

    def _parts(self, flat, n: int) -> list:
        """Each cache tensor's contiguous ``[n, block bytes]`` part of a buffer of ``n`` blocks
        (tensor-major: one ``swap_blocks`` per cache tensor)."""
        view = flat[:n * self.block_bytes]
        return [view[n * o:n * (o + nb)].view(n, nb) for o, nb in zip(self.offsets, self.nbytes)]

    def _map(self, pool, fn, n: int) -> list:
        """``fn(run)`` over contiguous runs of ``range(n)``, one a thread of the pool (one run
        for few blocks), concatenated: each returns a list, one item a block."""
        if n < 4 or self.io_threads == 1:
            return fn(range(n))
        k = min(self.io_threads, n)
        runs = [range(n * j // k, n * (j + 1) // k) for j in range(k)]
        return [x for part in pool.map(fn, runs) for x in part]

    # -- loads -----------------------------------------------------------------------------

    @property
    def _closing(self) -> bool:
        """Shutdown began: loads under way are given up at once, no step's work is admitted."""
        gate = getattr(self, "_gate", None)
        return gate is not None and gate.closing

    def start_load_kv(self, meta: dict) -> list:
        """The step's loads: ``loads`` (the step that admits them reads them: filled before its
        forward) and ``async_loads`` (started on the loader thread; ``get_finished_loads``
        says when they are in the cache). Once shutdown began: refused (``_StepGate``)."""
        with self._gate.enter() as admitted:
            return self._start_loads(meta) if admitted else self._refuse_loads(meta)

    def _start_loads(self, meta: dict) -> list:
        """``meta["sources"]`` (request id -> where, for loads not from the connector's own
        store: ``_source``) travels with each load's blocks as ``(key, block, where)``."""
        background = meta.get("async_loads") or []
        sources = meta.get("sources") or {}
        if background:
            torch = torch_module()
            # The copies wait for the work queued so far (steps in flight may still write a
            # block these requests were given after it was freed), not for what comes later.
            after = None
            if self._stream is not None:
                after = torch.Event(device=self.device)
                after.record()
            if self._loader is None:
                self._loader = DaemonPool(1, "tessellm-kv-load")
            with self._load_cond:
                for rid, _ in background:
                    self._load_status[rid] = None
            for rid, pairs in background:
                # ... and for saves' copies still reading a block it was given after a free
                blocks = {b for _, b in pairs}
                waits = [after] + [e for e, bs in self._reads if not bs.isdisjoint(blocks)]
                items = [(key, block, sources.get(rid)) for key, block in pairs]
                if self.device.type == "xla":  # lazy tensors are traced on the thread that
                    self._load_in_background(rid, items, None)  # steps: load here, done next step
                else:
                    try:
                        future = self._loader.submit(self._load_in_background, rid, items,
                                                     None if after is None else waits)
                    except RuntimeError:  # the loader shut down under the step: a failed load
                        self._set_load_status(rid, False)
                        continue
                    # a load cancelled before it ran (the loader shut down) is a failed load
                    future.add_done_callback(
                        lambda f, rid=rid: f.cancelled() and self._set_load_status(rid, False))
        loads = meta.get("loads") or []
        if not loads:
            return []
        items = [(key, block, sources.get(rid)) for rid, pairs in loads for key, block in pairs]
        bad = self._load(items, None, None)
        failed, start = [], 0
        for rid, pairs in loads:
            if bad.intersection(range(start, start + len(pairs))):
                failed.append(rid)
            start += len(pairs)
        return failed

    def _refuse_loads(self, meta: dict) -> list:
        """A step's loads once shutdown began (a step racing the engine's shutdown): each
        fails, recomputed, as a load given up under way; the pools that ended are not made
        again (a new one would outlive the connector, its reads into pools already gone)."""
        background = [rid for rid, _ in meta.get("async_loads") or []]
        loads = [rid for rid, _ in meta.get("loads") or []]
        if background or loads:
            logger.warning("KV connector asked for %d load(s) after its shutdown: they fail "
                           "(recomputed).", len(background) + len(loads))
        with self._load_cond:
            for rid in background:
                self._load_status[rid] = False
            self._load_cond.notify_all()
        return loads

    def _load_in_background(self, rid: str, items: list, after) -> None:
        """On the loader thread: the request's files (``(key, block, where)`` items) into its
        blocks, on the connector's own stream (the forward passes go on meanwhile), then its
        status once the copies are done."""
        ok = False
        try:
            torch = torch_module()
            # grad modes are thread-local: the cache may be inference tensors (written only in
            # inference mode) or not (xla's: an inference view of them cannot be written)
            inference = any(cache.is_inference() for cache in self.caches)
            with torch.inference_mode() if inference else torch.no_grad():
                ok = not self._load(items, self._stream, after, wait=True)
        except CancelledError:  # (the pools shut down under it): a failed load, no traceback
            logger.info("KV load of request %s cancelled: it is recomputed.", rid)
        except Exception:  # noqa: BLE001 - a failed load is a recompute, never a dead engine
            logger.exception("KV load of request %s failed: it is recomputed.", rid)
        self._set_load_status(rid, ok)

    def _set_load_status(self, rid: str, ok: bool) -> None:
        with self._load_cond:
            if self._load_status.get(rid, False) is None:  # (once: a load reports once)
                self._load_status[rid] = ok
            self._load_cond.notify_all()

    def get_finished_loads(self, request_ids: list, timeout: float = 0.0) -> dict:
        """Of ``request_ids`` (background loads the scheduler waits for), those finished on
        this rank: request id -> True (in the cache) or False (failed: recompute). Waits up to
        ``timeout`` seconds for one when none is. Forgets finished loads no longer asked about."""
        wanted = set(request_ids)
        with self._load_cond:
            if timeout > 0:
                self._load_cond.wait_for(
                    lambda: any(self._load_status.get(r) is not None for r in wanted), timeout)
            for rid in [r for r, s in self._load_status.items() if s is not None and r not in wanted]:
                del self._load_status[rid]
            return {r: self._load_status[r] for r in request_ids
                    if self._load_status.get(r) is not None}

    def _load(self, items: list, stream, after, wait: bool = False) -> set:
        """``(key, block, where)`` items (``where``: the store to read from, None: the
        connector's own) read from their files and copied into the blocks, a staging
        chunk at a time over two buffers, pipelined: a chunk's reads are queued on the reader
        pool before the chunk before it is copied in, so each reader goes on to the next chunk
        as it finishes its part of this one (none waits for the slowest at a chunk's end, and
        ZmqPeer's TCP streams do not drain there) while the finished chunk is copied to the
        device. ``stream``: the copies' stream (None: the current one); ``after``: events
        they wait for; ``wait``: return once the copies are done. Returns the indices that
        failed (their blocks may hold anything)."""
        staging, bad = self._load_staging, set()
        starts = list(range(0, len(items), staging.chunk))
        last = cur = ahead = None
        try:
            for k, lo in enumerate(starts):
                cur, ahead = ahead or self._read_chunk(items, lo, staging.acquire()), None
                if k + 1 < len(starts):
                    # the other buffer, once its copies are done (not one another load holds:
                    # then, at once, this chunk is read after the one before, as without the
                    # pipeline)
                    flat = staging.acquire(wait=False)
                    if flat is not None:
                        ahead = self._read_chunk(items, starts[k + 1], flat)
                event, after = self._copy_chunk(cur, stream, after, bad)
                staging.release(cur.flat, event)  # reused once its copies are done
                cur, last = None, event or last
        except BaseException as exc:
            # Nothing may still copy into the blocks once this returns (a failed load's
            # blocks are freed) nor into or out of a buffer once it is given back: the reads
            # into a buffer end first (waited for within the load bound), or the buffer is
            # never given out again (reads hung in the store may still write into it).
            again = not isinstance(exc, _LoadGivenUp)  # (given up: the bound is spent)
            settled = [c is not None and self._reads_settle(c, again) for c in (cur, ahead)]
            if stream is not None:
                stream.synchronize()
            else:
                self.synchronize()
            for c, done in zip((cur, ahead), settled):
                if c is not None:
                    (staging.release if done else staging.lose)(c.flat)
            if isinstance(exc, _LoadGivenUp):  # a failed load, as a missing block's
                logger.debug("KV load of %d block(s) given up: %s", len(items), exc)
                return set(range(len(items)))
            raise
        if wait and last is not None:
            wait_event(last)
        return bad

    def _read_chunk(self, items: list, lo: int, flat) -> "_LoadChunk":
        """A staging chunk's files (``items[lo:]``, a chunk's worth) queued on the reader pool
        into ``flat``, a run of blocks a thread."""
        chunk = items[lo:lo + self._load_staging.chunk]
        n = len(chunk)
        try:
            parts = self._parts(flat, n)
            arr = flat.numpy()
        except BaseException:
            self._load_staging.release(flat)  # nothing reads into it yet: a lost one would
            raise  # leave a later load waiting for a buffer forever

        clock = [time.monotonic()]

        def read(run) -> list:  # a pool thread
            me = threading.get_ident()
            where = chunk[run.start][2]
            routed = () if where is None else (where,)  # (a subclass's read_run without it too)
            self._reader_clock.clock = clock
            self._reading()  # (each block's read, each reply of a peer's, again)
            try:
                got = self.read_run([chunk[i][0] for i in run], run, arr, n, *routed)
            finally:
                self._read_since.pop(me, None)
                self._reader_clock.clock = None
            if any(g is not None and g[0] == 1 for g in got):
                sums = fmt.sum_parts(parts, run)
                for j, g in enumerate(got):
                    if g is not None and g[0] == 1 and int(sums[j]) != g[1]:
                        self.discard(chunk[run[j]][0], "checksum mismatch", *routed)
                        got[j] = None
            return [g is not None for g in got]

        k = 1 if n < 4 else min(self.io_threads, n)
        runs = _split_at_source([range(n * j // k, n * (j + 1) // k) for j in range(k)], chunk)
        futures = []
        try:
            for r in runs:
                futures.append(self._readers.submit(read, r))
        except Exception as exc:  # noqa: BLE001 - the pool shut down under the load
            # The reads queued write into ``flat``: they end first. The chunk then fails
            # (every block of it: a failed load, recomputed) and ``_load`` gives ``flat`` back
            # as any chunk's (a buffer lost here would leave a later load waiting forever).
            if not self._reads_settle(_LoadChunk(lo, chunk, flat, parts, futures, clock)):
                self._load_staging.lose(flat)  # hung reads may still write into it
                raise _LoadGivenUp(f"its reads could not be queued ({exc}) and those queued hang")
            logger.warning("KV load could not queue its reads (%s): it is recomputed.", exc)
            failed: Future = Future()
            failed.set_result([False] * n)
            futures = [failed]
        return _LoadChunk(lo, chunk, flat, parts, futures, clock)

    def _copy_chunk(self, c: "_LoadChunk", stream, after, bad: set) -> tuple:
        """A chunk whose reads were queued (``_read_chunk``): once they are done, the indices
        that failed (from ``c.lo``) added to ``bad``, the rest copied into their blocks.
        Returns the copies' event (None: done, or nothing copied) and the events later
        copies still wait for."""
        torch = torch_module()
        oks = self._await_reads(c)
        bad.update(c.lo + i for i, ok in enumerate(oks) if not ok)
        mapping = [(i, c.chunk[i][1]) for i, ok in enumerate(oks) if ok]
        if not mapping:
            return None, after
        if stream is None:
            self._copy_in(c.parts, mapping)
            return copies_done(torch, self.device), after
        with stream:
            for wait in after or ():
                stream.wait_event(wait)
            self._copy_in(c.parts, mapping)
            event = torch.Event(device=self.device)
            event.record(stream)
        return event, None  # the stream keeps the order from here on

    def _await_reads(self, c: "_LoadChunk") -> list:
        """A chunk's read results (an ok a block), once its reads are done; raises
        ``_LoadGivenUp`` when they are not waited for any more: the connector shuts down, a
        read was cancelled, or a read of the store's has hung past ``load_timeout`` (then the
        store is marked down: saves skip it). The bound is on progress, the load's own: no
        block of the chunk started (or, from a peer, no reply came) for ``load_timeout``
        since the later of that and this wait's start; another load's hung read does not fail
        this one, unless every reader thread is in a read hung past the bound: then reads
        queued cannot start, and the load fails at once."""
        start = time.monotonic()
        while True:
            pending = [f for f in c.futures if not f.done()]
            if not pending:
                break
            if self._closing:
                raise _LoadGivenUp("the connector shuts down")
            now = time.monotonic()
            hung = now - max(start, c.clock[0])
            stuck = [t for t in list(self._read_since.values()) if now - t > self.load_timeout]
            if len(stuck) >= self.io_threads and not all(f.running() for f in pending):
                raise _LoadGivenUp(f"every reader thread hangs in a read of {self.store_name()}")
            if hung > self.load_timeout:
                self._worker_down(f"a read not done after {hung:.1f} s", give_up=False)
                raise _LoadGivenUp(f"a read of {self.store_name()} not done after {hung:.1f} s")
            wait_futures(pending, _POLL_S, FIRST_COMPLETED)
        if any(f.cancelled() for f in c.futures):
            raise _LoadGivenUp("its reads were cancelled (the reader pool shut down)")
        return [ok for f in c.futures for ok in f.result()]

    def _reads_settle(self, c: "_LoadChunk", wait: bool = True) -> bool:
        """Whether a chunk's reads are all done (none writes into its buffer any more),
        waiting for them within the load bound (``_await_reads``) if ``wait``. Reads not
        waited for any more that have not started are cancelled: they never read the store
        for the load given up, nor hold its buffer (which then goes back to the pool)."""
        if wait:
            try:
                self._await_reads(c)
                return True
            except _LoadGivenUp:
                pass
            except BaseException:  # noqa: BLE001 - a read that raised is done
                return True
        for f in c.futures:
            f.cancel()  # (False for one under way: that one may still write into the buffer)
        return all(f.done() for f in c.futures)

    def _read_hung(self) -> Optional[float]:
        """How long the oldest block read under way has taken, if longer than the load bound
        (it hangs), else None."""
        since = list(getattr(self, "_read_since", {}).values())
        age = time.monotonic() - min(since) if since else 0.0
        return age if age > self.load_timeout else None

    def _reading(self) -> None:
        """A reader pool thread starts a block's read (or got a reply from a peer): the load
        bound counts from here."""
        local = getattr(self, "_reader_clock", None)  # (none: not a reader pool's call)
        clock = getattr(local, "clock", None)
        if clock is not None:
            clock[0] = self._read_since[threading.get_ident()] = time.monotonic()

    # -- the store: files (a subclass may keep blocks elsewhere) ----------------------------

    def read_run(self, keys: list, run: range, flat, n: int, where: Optional[str] = None) -> list:
        """``read_blocks`` of blocks ``run`` of a staging buffer of ``n`` (``flat``: its uint8
        numpy array), on a reader pool thread; ``where``: the store they come from (None: the
        connector's own; a subclass that routes, ``_source``, reads its)."""
        mv = memoryview(flat)
        return self.read_blocks(keys, [self._views(mv, n, i) for i in run])

    def _placer(self, flat, n: int, first: int = 0):
        """``place(i, payload)``: a block's payload (uint8, every cache tensor's part in order)
        into block ``first + i`` of a staging buffer of ``n`` (``flat``: uint8 numpy): one
        strided copy (numpy lets the GIL go) when the parts are of one size."""
        import numpy as np

        if len(set(self.nbytes)) == 1:
            tensors, nb = len(self.nbytes), self.nbytes[0]
            grid = flat[:n * self.block_bytes].reshape(tensors, n, nb)

            def place(i: int, payload) -> None:
                np.copyto(grid[:, first + i], payload.reshape(tensors, nb))
        else:
            def place(i: int, payload) -> None:
                j = first + i
                for o, nb in zip(self.offsets, self.nbytes):
                    np.copyto(flat[n * o + j * nb:n * o + (j + 1) * nb], payload[o:o + nb])
        return place

    def read_blocks(self, keys: list, views: list) -> list:
        """This rank's blocks of ``keys`` read into ``views`` (each block's payload parts), on
        a reader pool thread: per block (checksum kind, checksum) of a whole block of this
        key, rank and layout (a crc32 checked; a sum64 is the caller's), else None."""
        rank, out = self.context.rank, []
        for key, v in zip(keys, views):
            self._reading()
            out.append(fmt.read_block(self.path(key, rank), key, rank, self.layout,
                                      self.block_bytes, v))
        return out

    def discard(self, key: str, why, where: Optional[str] = None) -> None:
        """This rank's block of ``key`` (from ``where``: ``read_run``'s) failed its load:
        nobody loads it again."""
        fmt.drop(self.path(key, self.context.rank), why)

    def present(self, key: str) -> bool:
        """Whether this rank's block of ``key`` is in the store (a writer pool thread)."""
        return os.path.exists(self.path(key, self.context.rank))

    def _copy_in(self, parts, mapping) -> None:
        for cache, part in zip(self.caches, parts):
            src = part.view(cache.dtype).view(part.shape[0], *cache.shape[1:])
            self.swap_blocks(src, cache, mapping)

    # -- saves -----------------------------------------------------------------------------

    def save_kv(self, meta: dict):
        """The step's saves (``_save``); once shutdown began they are skipped (``_StepGate``)."""
        with self._gate.enter() as admitted:
            if admitted:
                return self._save(meta)
        saves = meta.get("saves") or ()
        if saves:
            logger.warning("KV connector asked to save %d block(s) after its shutdown began: "
                           "skipped.", len(saves))
            self._settle(skipped=len(saves))
        return None

    def _save(self, meta: dict):
        """Queue the copies of the blocks to save behind the step's forward, a staging chunk
        at a time, and hand each chunk to the writer thread: it waits for the chunk's copies
        (an event, not a stream sync: the host goes on launching the next step) and writes the
        files over its pool, skipping blocks whose file is there already (that check, a
        ``stat``, runs there: the step never waits for the file system). Returns what the
        step's outputs wait for when the metadata says they do (``wait``: every save so far
        written, or the store given up on), else None (the writes go on behind later steps).
        While the store counts as down the saves are skipped (counted), nothing copied."""
        torch = torch_module()
        saves = [(k, b) for k, b in (meta.get("saves") or ())]
        owners = meta.get("save_owners")
        if self._failed_loads and owners:  # computed over a failed load: never saved
            kept = [s for s, rid in zip(saves, owners) if rid not in self._failed_loads]
            self._settle(dropped=len(saves) - len(kept))
            saves = kept
        if saves and self._store_down():
            self._settle(skipped=len(saves))
            saves = []
        staging, stream = self._save_staging, self._save_stream
        if saves and stream is not None:  # the copies wait for the step, the next step does not
            ready = torch.Event(device=self.device)
            ready.record()
            stream.wait_event(ready)
        for lo in range(0, len(saves), staging.chunk):
            chunk = saves[lo:lo + staging.chunk]
            n = len(chunk)
            # waits for a writer when the disk is behind; not for one that hangs
            flat = staging.acquire(give_up=self._store_down)
            if flat is None:  # every buffer is with a write that hangs: the store is down
                self._settle(skipped=len(saves) - lo)
                break
            task = _SaveChunk(n)
            try:  # the buffer is the writer's once submitted; until then, given back here
                parts = self._parts(flat, n)
                mapping = [(b, i) for i, (_, b) in enumerate(chunk)]
                with stream if stream is not None else contextlib.nullcontext():
                    for cache, part in zip(self.caches, parts):
                        self.swap_blocks(cache, part.view(cache.dtype).view(n, *cache.shape[1:]),
                                         mapping)
                    event = copies_done(torch, self.device, stream)
                if stream is not None:  # a later step writing one of these blocks waits for them
                    self._reads.append((event, frozenset(b for _, b in chunk)))
                if self._writer is None:
                    self._writer = DaemonPool(1, "tessellm-kv-save")
                task.future = self._writer.submit(self._write_chunk, task, chunk, flat, parts,
                                                  event)
            except BaseException:
                self._settle(failed=len(saves) - lo)  # this chunk's and the rest: not saved
                self._save_back(flat, stream)
                raise
            with self._pending_lock:
                self._pending.append(task)
        self._reap_saves()
        if meta.get("wait") and self._pending:
            # one writer thread, in order: the last is the latest
            return _SavesDone(self, self._pending[-1].future)
        return None

    def _save_back(self, flat, stream) -> None:
        """A save buffer whose chunk failed before the writer got it, back to the pool once the
        copies queued into it so far are done (lost where that cannot be known: never given
        out again while a copy may still write into it)."""
        try:
            event = copies_done(torch_module(), self.device, stream)
        except Exception:  # noqa: BLE001 - the device's error is the one raised
            self._save_staging.lose(flat)
            return
        self._save_staging.release(flat, event)

    def _reap_saves(self) -> None:
        """Saves written (or given up on) leave ``_pending``; a writer's error is raised."""
        done = []
        with self._pending_lock:
            while self._pending and (self._pending[0].future.done() or self._pending[0].abandoned):
                done.append(self._pending.popleft())
        for task in done:
            if task.future.done() and not task.abandoned:
                task.future.result()

    def _store_down(self) -> bool:
        """Whether saves are to be skipped: the store counts as down, or a call into it has
        hung past ``lookup_timeout_ms`` (then it is marked down, and the saves under way are
        given up)."""
        if self.health.down():
            return True
        hung = self._hung()
        if hung is None:
            return False
        self._worker_down(f"a call of the store's not done after {hung:.1f} s")
        return True

    def _worker_down(self, why: str, give_up: bool = True) -> None:
        """The store is down (marked, counted); ``give_up``: the saves not written yet are
        given up (counted as skipped)."""
        self.health.mark_down(why)
        with self._settled_lock:
            self._settled[4] = self.health.falls
        if not give_up:
            return
        with self._pending_lock:
            tasks = [t for t in self._pending if not t.future.done()]
        for task in tasks:
            task.abandoned = True
            self._settle_chunk(task, skipped=task.n)
        self._abandoned = [t for t in self._abandoned + tasks if not t.future.done()]
        self._reap_saves()

    def _wait_saves(self, future) -> None:
        """Until ``future`` (a chunk's save, and every one before it) is done, or the store
        is down: then the saves left are given up and this returns."""
        while True:
            try:
                future.result(_POLL_S)
                return
            except TimeoutError:
                if self._store_down():
                    self._worker_down("saves waited for hang")
                    return

    def _write_chunk(self, task, saves, flat, parts, event) -> None:
        """On the writer thread: a chunk's files, over the write pool, once its copies are done
        (none if it was given up on meanwhile: the store is down)."""
        try:
            if event is not None:
                wait_event(event)  # the step's copies into the buffer are done
            if task.abandoned:
                return
            n = len(saves)
            mv = memoryview(flat.numpy())

            def write(run) -> list:  # a pool thread: which files are missing, their sum64s, them
                # A file already there (another engine's, an earlier save of this block) is
                # kept: a whole file of this block, whoever wrote it. Two savers that both find
                # none each write a whole file and rename it (shared_storage_format.py).
                me = threading.get_ident()
                try:
                    self._io_since[me] = time.monotonic()  # a stat per block: timed as one call
                    todo = [j for j, i in enumerate(run) if not self.present(saves[i][0])]
                    done = [False] * len(run)
                    if not todo:
                        return done
                    sums = fmt.sum_parts(parts, run) if self.checksum == "sum64" else None
                    for j in todo:
                        if task.abandoned:  # the store went down: the rest are not tried
                            done[j] = None
                            continue
                        i = run[j]
                        self._io_since[me] = time.monotonic()
                        done[j] = self._write(saves[i][0], self._views(mv, n, i),
                                              None if sums is None else int(sums[j]))
                    return done
                finally:
                    self._io_since.pop(me, None)

            results = self._map(self._writers, write, n)
            del mv
            written = sum(1 for r in results if r is True)
            present = sum(1 for r in results if r is False)
            self.files_written += written
            self.files_present += present
            self._settle_chunk(task, saved=written + present, failed=n - written - present)
        except BaseException:
            self._settle_chunk(task, failed=len(saves))  # nothing of the chunk is known written
            raise
        finally:
            self._save_staging.release(flat)

    def _settle(self, saved: int = 0, failed: int = 0, dropped: int = 0, skipped: int = 0) -> None:
        if saved or failed or dropped or skipped:
            with self._settled_lock:
                for i, k in enumerate((saved, failed, dropped, skipped)):
                    self._settled[i] += k

    def _settle_chunk(self, task, **counts) -> None:
        """A chunk's saves settled, once (the writer and a give-up may both try)."""
        with self._settled_lock:
            if task.settled:
                return
            task.settled = True
        self._settle(**counts)

    def save_totals(self, timeout: float = 0.0) -> Optional[list]:
        pending = getattr(self, "_pending", None)
        if pending is None:
            return None
        if pending:
            if timeout > 0:
                from concurrent.futures import wait

                wait([t.future for t in pending], timeout)
            if not pending[-1].future.done() and self._store_down():  # saves hung: given up
                self._worker_down("saves hang")
        with self._settled_lock:
            totals = list(self._settled)
        return totals if any(totals) else None

    def write_block(self, key: str, views: list, sum64: Optional[int]) -> None:
        """This rank's block of ``key`` (its payload parts) into the store; raises OSError."""
        fmt.write_block(self.path(key, self.context.rank), key, self.context.rank, self.checksum,
                        self.layout, self.block_bytes, views, sum64)

    def _write(self, key: str, views: list, sum64: Optional[int]) -> Optional[bool]:
        """One block saved: True (written) or None (not: warned about once; an error of the
        store's, not the block's, marks the store down)."""
        try:
            self.write_block(key, views, sum64)
            return True
        except OSError as exc:
            if exc.errno in _DEAD_ERRNOS:  # (a pool thread: the saves queued fail fast)
                self._worker_down(f"a write failed: {exc}", give_up=False)
            elif not self._warned:  # a full disk: every later save would say the same
                logger.warning("KV block %s (rank %d) not saved (%s); later failures are not "
                               "logged.", key, self.context.rank, exc)
                self._warned = True
            return None

    def pending_block_reads(self) -> bool:
        reads = getattr(self, "_reads", None)
        while reads and reads[0][0].query():
            reads.popleft()
        return bool(reads)

    def before_writing(self, block_ids: set) -> None:
        for event, blocks in self._reads:
            if not blocks.isdisjoint(block_ids):
                event.wait()  # the current stream waits for that chunk's copies

    def wait_for_save(self) -> None:
        """Every save so far written, or the store down (the rest given up)."""
        if getattr(self, "_pending", None):
            self._wait_saves(self._pending[-1].future)

    def shutdown(self) -> None:
        """The saves under way are written first, while the store takes them (a write hung past
        ``lookup_timeout_ms`` gives up the rest); loads under way are given up at once (they
        fail: a running engine recomputes them); then the pools end, waited for
        ``lookup_timeout_ms`` in all at most (the readers ``_READERS_EXIT_S``: a load that gave
        up no longer waits for them): a thread still in a call of the store's then (a hung
        read or write) is left behind, a daemon (logged). A step's load or save racing it is
        either refused or waited for (``_StepGate``): none makes or uses a pool after this."""
        gate = getattr(self, "_gate", None)
        if gate is not None and not gate.close(self.lookup_timeout + _READERS_EXIT_S):
            logger.warning("KV connector shut down while a step's load or save was still under "
                           "way after %.1f s.", self.lookup_timeout + _READERS_EXIT_S)
        if getattr(self, "_pending", None) is not None:
            self.wait_for_save()
            hung = sum(t.n for t in self._abandoned if not t.future.done())
            if hung:
                logger.warning("KV connector shut down with %d block(s) not saved: %s hangs.",
                               hung, self.store_name())
        deadline = time.monotonic() + self.lookup_timeout
        left = []
        for name in ("_loader", "_writer", "_writers", "_readers"):
            pool = getattr(self, name, None)
            if pool is not None:
                bound = max(0.0, deadline - time.monotonic())
                if name == "_readers":  # (a hung read writes only into a staging buffer,
                    bound = min(bound, _READERS_EXIT_S)  # nobody's once the loads gave up)
                left += pool.shutdown(wait=True, cancel_futures=True, timeout=bound)
                setattr(self, name, None)
        if left:
            logger.warning("KV connector shut down leaving %d thread(s) in calls of %s that "
                           "have not returned (%s): daemons, they end with the process.",
                           len(left), self.store_name(), ", ".join(t.name for t in left))
