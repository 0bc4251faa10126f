"""``SharedStorageConnector``: KV blocks as files in a directory that several engines share.

Disaggregated prefill on one host (or over a shared file system): a producer engine
(``kv_role: kv_producer``) saves the KV of every block it fills; a consumer engine
(``kv_consumer``) finds a prompt's blocks there and loads them instead of recomputing; an
engine with ``kv_both`` does both, a disk tier behind its prefix cache.

The connector in three modules:

    shared_storage.py          this: settings, the scheduler half (keys, lookups, what each
                               step loads and saves), the class
    shared_storage_format.py   the files: layout, header, checksums, one block read / written
    shared_storage_worker.py   the worker half: staging buffers, loader / writer threads, pools

A block's key is its chained prefix hash (sha256, stable across processes); its file is
``<shared_storage_path>/<namespace>/<key>.r<rank>.kv``, exactly a header and the block's bytes
long, so the scheduler checks a block with one ``stat`` per rank. The default checksum,
``sum64``, is the sum of the payload's 64-bit words modulo 2**64 (numpy, at memory speed, over
all the step's blocks at once: it catches any changed word, not swapped ones); ``"checksum":
"crc32"`` (zlib, ~1 GB/s a core) or ``"none"`` in ``kv_connector_extra_config``. Files are
written to a temporary name and renamed: a reader sees a whole file or none. A file that is
missing, of another length, layout or key, or whose checksum fails is a miss: the scheduler
checks each rank's size before it counts a block as loadable; the worker checks the rest when
it loads, and a failure there makes the request recompute (``base.py``) and removes the file
(a producer's next save of that block writes it afresh). Nothing else is ever deleted: the
directory grows until someone clears it.

The worker half moves blocks through staging buffers of a chunk of blocks each, made once and
kept (pinned where the device pins; tensor-major so each cache tensor's part is one
``swap_blocks``); a pool of threads reads the files straight into them (``preadv``, one call
per file) and writes them from them (``writev``): no intermediate copies, the file I/O outside
the GIL. Loads run in the background by default (``load_async``): a loader thread reads a
request's files and copies them into its blocks on the connector's own stream while the
engine runs other requests, and ``get_finished_loads`` reports them. Saves are written behind
the step (whether a block's file is there already is asked on the write pool, never in the
step); outputs wait for them only with ``wait_for_save`` (then only in a step that samples a
token for a request with saves in flight).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from typing import Optional

from tessellm.kv_transfer.base import KVConnectorBase, KVConnectorRole
from tessellm.kv_transfer.params import remote_decode
from tessellm.kv_transfer.shared_storage_format import (CHECKSUMS, HEADER_BYTES, MAGIC,
                                                        adapter_identity, block_path, chain_key,
                                                        loadable, probe)
from tessellm.kv_transfer.shared_storage_worker import SharedStorageWorker
from tessellm.kv_transfer.threads import DaemonPool, StoreHealth

logger = logging.getLogger(__name__)

_EXTRA_KEYS = {"shared_storage_path", "checksum", "wait_for_save", "io_threads", "load_async",
               "lookup_wait_ms", "lookup_timeout_ms", "store_down_ms"}
_MAX_CHECKED = 1 << 17  # keys remembered as present (~20 MB of strings)
_LOOKUP_TTL_S = 1.0  # a waiting request's miss is looked up again after this (a producer writes)


class _Lookup:
    """A request's lookup off the step: the one under way (``future``: found keys, first
    miss), whether one came back (``answered``; or was given up on: its time ran out), its
    first missing block's index (None: none missing), when it came back, whether a step waited
    for it already (``waited``: once), when the request's first lookup started (``since``),
    and where it looks (``where``: None, the connector's own store; else the producer its
    kv_transfer_params name, ``_source``)."""

    __slots__ = ("future", "answered", "miss", "when", "waited", "since", "where")

    def __init__(self, where: Optional[str] = None):
        self.future, self.answered, self.miss, self.when = None, False, None, 0.0
        self.waited, self.since, self.where = False, time.monotonic(), where


def _params(req) -> Optional[dict]:
    return getattr(getattr(req, "sampling_params", None), "kv_transfer_params", None)


def _seconds(name: str, extra: dict, key: str, default: float, meaning: str,
             zero: bool = False) -> float:
    """``extra[key]`` (milliseconds, ``default`` when absent) in seconds; a bool, a non-number,
    a negative value (or 0 unless ``zero``) is refused naming ``meaning``."""
    value = extra.get(key, default)
    if (not isinstance(value, (int, float)) or isinstance(value, bool)
            or value < 0 or (value == 0 and not zero)):
        raise ValueError(f"{name}'s {key} is {meaning}, got {value!r}.")
    return value / 1000

class SharedStorageConnector(SharedStorageWorker, KVConnectorBase):
    """Files in a shared directory (module docstring); the worker half is ``SharedStorageWorker``."""

    extra_keys = _EXTRA_KEYS  # the settings a subclass reads (kv_connector_extra_config)

    def __init__(self, config, role, context):
        super().__init__(config, role, context)
        extra = config.kv_connector_extra_config
        name = type(self).__name__
        unknown = sorted(set(extra) - self.extra_keys)
        if unknown:
            raise ValueError(f"{name}'s kv_connector_extra_config has unknown "
                             f"key(s) {unknown}; it reads {', '.join(sorted(self.extra_keys))}.")
        self.checksum = extra.get("checksum", "sum64")
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"{name}'s checksum must be one of {', '.join(CHECKSUMS)}, "
                             f"got {self.checksum!r}.")
        wait = extra.get("wait_for_save", False)
        load_async = extra.get("load_async", True)
        threads = extra.get("io_threads", min(8, os.cpu_count() or 1))
        if (not isinstance(wait, bool) or not isinstance(load_async, bool)
                or not isinstance(threads, int) or threads < 1):
            raise ValueError(f"{name}'s wait_for_save and load_async are true or "
                             f"false and its io_threads a positive integer, got {wait!r}, "
                             f"{load_async!r} and {threads!r}.")
        self.wait_for_saves, self.load_async, self.io_threads = wait, load_async, threads
        self.lookup_wait = _seconds(name, extra, "lookup_wait_ms", 2, "how long a step may wait "
                                    "for lookups in all (milliseconds, 0: never)", zero=True)
        self.lookup_timeout = _seconds(name, extra, "lookup_timeout_ms", 5000, "how long a request "
                                       "waits for its lookup before it computes its prompt "
                                       "instead (milliseconds, above 0)")
        self.store_down = _seconds(name, extra, "store_down_ms", 5000, "how long a store that hung "
                                   "or failed counts as down before a probe asks it again "
                                   "(milliseconds, above 0)")
        self._wait_left = self.lookup_wait  # of this step's (build_connector_meta starts another)
        # A load whose block read (a file's, a peer's reply) has not come back after this many
        # seconds hangs: it fails and its request computes its prompt (setup_store may set
        # another: ZmqPeer's timeout_s).
        self.load_timeout = self.lookup_timeout
        self.setup_store(extra)
        # Whether the store counts as down (this half's view: the scheduler half's lookups, a
        # worker's writes), and the store calls under way on this half's threads: thread ->
        # when its current call started (a call older than lookup_timeout_ms hangs).
        self.health = StoreHealth(self.store_name(), self.store_down, self._probe)
        self._io_since: dict = {}
        self._init_state()

    def setup_store(self, extra: dict) -> None:
        """Where the blocks go (here: the directory), from ``kv_connector_extra_config``."""
        path = extra.get("shared_storage_path")
        if not isinstance(path, str) or not path:
            raise ValueError("SharedStorageConnector needs kv_connector_extra_config."
                             "shared_storage_path, the directory its KV files go in, e.g. "
                             "'{\"shared_storage_path\": \"/tmp/kv\"}'.")
        self.root = os.path.join(path, self.context.namespace)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"SharedStorageConnector cannot use shared_storage_path {path!r}: "
                             f"{exc.strerror or exc}; give a writable directory.") from None

    def _init_state(self) -> None:
        # The scheduler half: per request, its blocks' keys and how many are saved or loaded.
        self._keys: dict[str, list[str]] = {}
        self._saved: dict[str, int] = {}  # leading blocks already saved or offered to the workers
        self._loads: list = []  # [request id, [[key, block], ...]] for the next step
        self._unsynced: set = set()  # requests with saves that no output of theirs waited for
        # Keys whose files every rank has, checked (LRU): a request retried while the cache is
        # full, or a hot prefix, is not checked file by file again. A file that goes away
        # after the check fails its load on the worker: a recompute, never a wrong token.
        self._checked: OrderedDict[str, None] = OrderedDict()
        self._adapters: dict[str, str] = {}  # adapter directory -> adapter_identity (read once)
        # Lookups off the step (get_num_new_matched_tokens): request id -> its _Lookup, while
        # the request lives; the thread pool that stats the files, made at the first lookup.
        self._lookups: dict[str, _Lookup] = {}
        self._lookup_threads = None
        self._shut = False  # shut down: no lookup pool is made again (lookups answer nothing)
        self._warned = False
        # Requests whose kv_transfer_params name a producer (``_source``): request id ->
        # [where, admitted once, counted in remote_prefill_fallbacks]; and where the next
        # step's loads read from (request id -> where; only those not from the own store).
        self._routes: dict[str, list] = {}
        self._load_sources: dict[str, str] = {}

    def path(self, key: str, rank: int) -> str:
        return block_path(self.root, key, rank)

    # -- scheduler half --------------------------------------------------------------------

    def block_keys(self, request) -> list[str]:
        """The request's keys, one per full block of its known tokens (extended as it grows)."""
        keys = self._keys.setdefault(request.request_id, [])
        tokens, bs = request.all_token_ids, self.context.block_size
        lora = None
        if request.lora_request is not None and (len(keys) + 1) * bs <= len(tokens):
            lora = self._adapter(request.lora_request.lora_path)
        while (len(keys) + 1) * bs <= len(tokens):
            i = len(keys)
            keys.append(chain_key(keys[-1] if keys else None, tokens[i * bs:(i + 1) * bs],
                                  request.block_key(i * bs, (i + 1) * bs, lora)))
        return keys

    def _adapter(self, path: str) -> str:
        """The adapter's part of the keys, read once per directory (an engine binds an id to
        one directory for its life: tessellm.lora.store)."""
        ident = self._adapters.get(path)
        if ident is None:
            ident = self._adapters[path] = adapter_identity(path)
        return ident

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int):
        """The request's loadable run of blocks after ``num_computed_tokens``, from keys known
        to be there (the LRU of checked keys) and the request's lookup: the files are never
        asked about here, in the scheduler's step, but on the lookup thread (``_look``). Until
        a request's first lookup is back it answers None (the scheduler asks again at the next
        admission attempt; idle, it waits for the lookup); after that, what is known at once,
        and a lookup that went stale (its first miss, or the first key not known, moved; or
        the miss is older than ``_LOOKUP_TTL_S``: a producer may have written it since) is
        refreshed in the background for the next attempt. A step waits for first lookups
        ``lookup_wait_ms`` (2) in all at most, and for each lookup once: on a local disk a
        request's lookup is back within it and the request is admitted in this step; a slow or
        hung store costs the step that first asks about a request 2 ms at most, never the later
        steps while that lookup is out. A first lookup not back within ``lookup_timeout_ms``
        (5 s) is given up on: the request is answered with what is known (``_give_up``) and
        computes the rest of its prompt."""
        if not self.config.is_consumer:
            return 0, False
        where = self._source(request)
        if where is not None and request.request_id not in self._routes:
            self._routes[request.request_id] = [where, False, False]
        # a dead mount (or default peer): no lookup, no load (it would hang too), but a request
        # routed to another producer still asks that one; shut down: its pool has ended
        if (where is None and self.health.down()) or self._shut:
            self.stats.record_lookup_skipped()
            return 0, False
        bs, rid = self.context.block_size, request.request_id
        keys = self.block_keys(request)
        lo, hi = num_computed_tokens // bs, (request.num_tokens - 1) // bs
        params = _params(request) or {}
        held = params.get("remote_num_tokens")
        if isinstance(held, int) and params.get("do_remote_prefill"):
            hi = max(lo, min(hi, held // bs))  # the producer holds no block past these
        look = self._lookups.get(rid)
        if look is not None and look.future is not None and look.future.done():
            self._settle_lookup(look)
        i = self._known(keys, lo, hi, where)
        if i >= hi:
            return (i - lo) * bs, self.load_async
        if look is None or (look.future is None and (look.miss != i or time.monotonic() - look.when
                                                     > _LOOKUP_TTL_S)):
            look = self._lookups[rid] = look or _Lookup(where)
            routed = () if where is None else (where,)  # (a subclass's _look(keys, start) too)
            look.future = self._lookup_pool().submit(self._timed, self._look, keys[i:hi], i, *routed)
        if not look.answered and not look.waited and self._wait_left > 0:
            look.waited = True  # a lookup still out after this is not waited for again
            t0 = time.monotonic()
            try:
                look.future.result(self._wait_left)
            except Exception:  # noqa: BLE001 - still under way (or failed: settled as nothing)
                pass
            self._wait_left -= time.monotonic() - t0
            if look.future.done():
                return self.get_num_new_matched_tokens(request, num_computed_tokens)
        if not look.answered and time.monotonic() - look.since >= self.lookup_timeout:
            self._give_up(look, i)
            return 0, False  # the store is down now: what it said before is not loaded either
        if not look.answered:
            return None, False
        return (i - lo) * bs, self.load_async

    def _give_up(self, look, miss: int) -> None:
        """A request's first lookup did not come back in time (a hung mount, a dead store): it
        counts as answered, missing from ``miss`` on, and the store is marked down (the
        request, and every request while it is down, computes its prompt without asking it).
        The lookup keeps its thread until the store answers; the request is not looked up
        again meanwhile, and once it is back its keys go in the LRU as any lookup's."""
        look.answered, look.miss, look.when = True, miss, time.monotonic()
        self.stats.record_lookup_timeout()
        self._mark_down(f"a lookup not back after {self.lookup_timeout:.1f} s", look.where)

    def _mark_down(self, why: str, where: Optional[str] = None) -> None:
        """The store is down (``where``: a producer a request named, not the own store: a
        subclass that routes marks that one alone)."""
        self.health.mark_down(why)
        self.stats.downs = self.health.falls

    def _source(self, request) -> Optional[str]:
        """Where the request's blocks are looked up and loaded from: None, the connector's own
        store (here always); a subclass that routes by ``kv_transfer_params`` returns the
        producer they name (plain data: it travels to the workers in the step's metadata)."""
        return None

    def _check_key(self, key: str, where: Optional[str]):
        """A key's entry in the LRU of keys known to be loadable, per store."""
        return key if where is None else (where, key)

    def _timed(self, fn, *args):
        """``fn(*args)``, a call into the store on a pool thread, timed (``_hung``)."""
        me = threading.get_ident()
        self._io_since[me] = time.monotonic()
        try:
            return fn(*args)
        finally:
            self._io_since.pop(me, None)

    def _hung(self) -> Optional[float]:
        """How long the oldest call into the store under way has taken, if longer than
        ``lookup_timeout_ms`` (it hangs; a block's read: longer than ``load_timeout``), else
        None."""
        since = list(self._io_since.values())
        age = time.monotonic() - min(since) if since else 0.0
        return age if age > self.lookup_timeout else self._read_hung()

    def _probe(self) -> None:
        """The probe's thread: the store answers (``probe_store``) and no call into it still
        hangs; raises otherwise (the store stays down)."""
        hung = self._hung()
        if hung is not None:
            raise TimeoutError(f"a call into it has hung {hung:.1f} s")
        self.probe_store()

    def probe_store(self) -> None:
        """A cheap question to the store (here: a ``stat`` of the directory and an ``open`` of
        a name no block has); raises (or hangs) unless it answers."""
        probe(self.root)

    def store_name(self) -> str:
        """The store, for messages."""
        return self.root

    def _known(self, keys: list, lo: int, hi: int, where: Optional[str] = None) -> int:
        """The first index from ``lo`` (below ``hi``) whose key is not known to be loadable
        from ``where``."""
        i = lo
        while i < hi and self._check_key(keys[i], where) in self._checked:
            self._checked.move_to_end(self._check_key(keys[i], where))
            i += 1
        return i

    def _settle_lookup(self, look) -> None:
        """A lookup is back (on the scheduler's thread): its keys found go in the LRU."""
        future, look.future = look.future, None
        try:
            found, miss = future.result()
        except Exception as exc:  # noqa: BLE001 - a lookup that fails finds nothing
            found, miss = [], None
            if isinstance(exc, OSError):  # the store's error (a missing file is a miss)
                self._mark_down(f"a lookup failed: {exc}", look.where)
        for key in found:
            self._checked[self._check_key(key, look.where)] = None
            self._checked.move_to_end(self._check_key(key, look.where))
        while len(self._checked) > _MAX_CHECKED:
            self._checked.popitem(last=False)
        look.miss, look.when, look.answered = miss, time.monotonic(), True

    def _look(self, keys: list, start: int, where: Optional[str] = None) -> tuple:
        """On the lookup thread: the keys, in order, whose files every rank has with the
        right length (one ``stat`` per rank), up to the first that is not; and that one's index
        (None: all were). ``where``: ``_source``'s (None here)."""
        found = []
        for key in keys:
            if not all(self._loadable(key, r) for r in range(self.context.world_size)):
                return found, start + len(found)
            found.append(key)
        return found, None

    def _lookup_pool(self):
        if self._lookup_threads is None:  # daemons: a lookup hung on a dead mount never holds
            # the process at exit
            self._lookup_threads = DaemonPool(min(4, self.io_threads), "tessellm-kv-lookup")
        return self._lookup_threads

    def wait_for_lookups(self, timeout: float) -> None:
        from concurrent.futures import FIRST_COMPLETED, wait

        self._wait_left = self.lookup_wait  # a step with nothing else: the next one's
        futures = [look.future for look in self._lookups.values() if look.future is not None]
        if futures:
            wait(futures, timeout, FIRST_COMPLETED)

    def _loadable(self, key: str, rank: int) -> bool:
        """The rank's file is there and exactly as long as a header and this engine's block
        (one ``stat``; the header and checksum are the worker's to check)."""
        sizes = self.context.rank_block_bytes
        return loadable(self.path(key, rank), sizes[rank] if sizes else None)

    def update_state_after_alloc(self, request, block_ids, first_block, num_blocks):
        rid = request.request_id
        route = self._routes.get(rid)
        if num_blocks:
            keys = self._keys[rid]
            self._loads.append([rid, [[keys[i], int(block_ids[i])]
                                      for i in range(first_block, first_block + num_blocks)]])
            self.stats.record_load(rid, num_blocks)  # counted once the load worked
            if route is not None:
                self._load_sources[rid] = route[0]
        if route is not None and not route[1]:  # its first admission: nothing from its producer
            route[1] = True  # (nor from this engine's own cache) is a fallback
            if first_block + num_blocks == 0:
                self._fall_back(route)
        # What it holds from admission on is saved already (or was loaded from here).
        self._saved[rid] = max(self._saved.get(rid, 0), first_block + num_blocks)

    def build_connector_meta(self, scheduler_output, requests, block_ids) -> Optional[dict]:
        self._wait_left = self.lookup_wait  # the next step's
        loads, self._loads = self._loads, []
        sources, self._load_sources = self._load_sources, {}
        background = []
        if self.load_async:
            loads, background = [], loads
        saves, starts, owners = [], {}, []
        if self.config.is_producer:
            starts = {r.request_id: r.num_computed_tokens for r in scheduler_output.new_requests}
            starts.update((c.request_id, c.num_computed_tokens)
                          for c in scheduler_output.cached_requests)
            bs = self.context.block_size
            for rid, num in scheduler_output.num_scheduled_tokens.items():
                req = requests.get(rid)
                if req is None or rid not in starts:
                    continue
                # Full after this step, every token known (not a draft, not a placeholder).
                full = min(starts[rid] + num, req.num_tokens) // bs
                done = self._saved.get(rid, 0)
                if full <= done:
                    continue
                keys, ids = self.block_keys(req), block_ids(rid)
                stop = min(full, len(keys), len(ids))
                saves += [[keys[i], int(ids[i])] for i in range(done, stop)]
                # whose they are: a worker drops those of a request whose load failed (computed
                # over it); none after that (a recompute never loads: it saves what it computes)
                owners += [None if req.kv_load_failed else rid] * max(0, stop - done)
                self._saved[rid] = full
                self._unsynced.add(rid)
            self.stats.record_offered(len(saves))  # counted as the workers report them
        # The step's outputs wait for the saves in flight when it samples a token for a request
        # that has any (its prompt's last chunk, or a decode): its response means its files.
        # A request's kv_transfer_params {"do_remote_decode": true} asks the same of its own
        # output (vLLM's disaggregation proxies send it to the prefill engine).
        wait = False
        if self._unsynced:
            num = scheduler_output.num_scheduled_tokens
            for rid in [r for r in self._unsynced if r in num]:
                req = requests.get(rid)
                if req is None or starts.get(rid, 0) + num[rid] >= req.num_tokens:
                    self._unsynced.discard(rid)
                    wait = wait or self.wait_for_saves or (req is not None and remote_decode(_params(req)))
        if not loads and not background and not saves and not wait:
            return None
        meta = {"loads": loads, "async_loads": background, "saves": saves, "save_owners": owners,
                "wait": wait}
        if sources:  # request id -> the producer its loads read from (absent: the own store)
            meta["sources"] = sources
        return meta

    def shutdown(self) -> None:
        self.health.close()  # a probe under way: not waited for (a hung mount)
        self._shut = True
        if self.role is KVConnectorRole.SCHEDULER:  # its lookups: not waited for (a hung mount)
            if self._lookup_threads is not None:
                self._lookup_threads.shutdown(wait=False, cancel_futures=True)
                self._lookup_threads = None
            return
        super().shutdown()

    def request_failed_load(self, request) -> None:
        # The worker removed the bad file: later lookups miss it. The request itself is
        # recomputed without the connector; it saves what it computes afresh.
        route = self._routes.get(request.request_id)
        for key in self._keys.get(request.request_id, ()):
            self._checked.pop(self._check_key(key, route and route[0]), None)
        if route is not None:
            self._fall_back(route)
        self._lookups.pop(request.request_id, None)
        self._saved.pop(request.request_id, None)
        self._unsynced.discard(request.request_id)

    def _fall_back(self, route: list) -> None:
        """A routed request computes its prompt instead of loading it (counted once)."""
        if not route[2]:
            route[2] = True
            self.stats.remote_prefill_fallbacks += 1

    def request_finished(self, request) -> Optional[dict]:
        self._keys.pop(request.request_id, None)
        self._lookups.pop(request.request_id, None)  # a lookup under way: its result goes
        self._saved.pop(request.request_id, None)
        self._unsynced.discard(request.request_id)
        self._routes.pop(request.request_id, None)
        return None  # the blocks are found by their keys: a decode needs nothing from here


__all__ = ["CHECKSUMS", "HEADER_BYTES", "MAGIC", "KVConnectorRole", "SharedStorageConnector",
           "adapter_identity", "chain_key"]
