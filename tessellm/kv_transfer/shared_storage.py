"""``SharedStorageConnector``: KV blocks as files in a directory that several engines share.

Disaggregated prefill on one host (or over a shared file system): a producer engine
(``kv_role: kv_producer``) saves the KV of every block it fills; a consumer engine
(``kv_consumer``) finds a prompt's blocks there and loads them instead of recomputing; an
engine with ``kv_both`` does both, a disk tier behind its prefix cache.

Layout::

    <shared_storage_path>/<namespace>/<key>.r<rank>.kv       one file per block and rank
    namespace: a digest of what makes blocks interchangeable (model config, dtypes, block size,
               tensor/pipeline layout, drafter); engines that differ never read each other's
    key:       the block's chained prefix hash, sha256 (as the prefix cache's, but stable
               across processes: key_i = sha256(key_{i-1}, tokens_i, extra_i), where extra is
               the prefix cache's extra key: cache salt, LoRA adapter, images; the adapter as a
               digest of its files, never its lora_int_id, which means something in one engine)

    file:  a 128-byte header | payload (the block of every cache tensor of the rank, in order)
    header: b"TSLKV\x00\x02\n", the key (64 bytes), rank (u32), checksum kind (u32: 0 none,
            1 sum64, 2 crc32), payload bytes (u64), checksum (u64), a digest of the rank's
            cache layout (16 bytes); little-endian, zero padded

A file is exactly header + payload bytes long, so the scheduler checks a block with one
``stat``. The default checksum, ``sum64``, is the sum of the payload's 64-bit words modulo 2**64
(numpy, at memory speed, over all the step's blocks at once: it catches any changed word, not
swapped ones); ``"checksum": "crc32"`` (zlib, ~1 GB/s a core) or ``"none"`` in
``kv_connector_extra_config``. Files are written to a temporary name and renamed: a reader sees
a whole file or none. A file that is missing, of another length, layout or key, or whose
checksum fails is a miss: the scheduler checks each rank's size before it counts a block as
loadable; the worker checks the rest when it loads, and a failure there makes the request
recompute (``base.py``) and removes the file (a producer's next save of that block writes it
afresh). Nothing else is ever deleted: the directory grows until someone clears it.

The worker half moves blocks through staging buffers of a chunk of blocks each, made once and
kept (pinned where the device pins; tensor-major so each cache tensor's part is one
``swap_blocks``); a pool of threads reads the files straight into them (``preadv``, one call
per file) and writes them from them (``writev``): no intermediate copies, the file I/O outside
the GIL. Loads run in the background by default (``load_async``): a loader thread reads a
request's files and copies them into its blocks on the connector's own stream while the
engine runs other requests, and ``get_finished_loads`` reports them. Saves are written behind
the step; outputs wait for them only with ``wait_for_save`` (then only in a step that samples
a token for a request with saves in flight).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import threading
import zlib
from collections import OrderedDict, deque
from typing import Optional

from tessellm.kv_transfer.base import KVConnectorBase, KVConnectorRole

logger = logging.getLogger(__name__)

MAGIC = b"TSLKV\x00\x02\n"
_HEADER = struct.Struct("<8s64sIIQQ16s")
HEADER_BYTES = 128  # the header, zero padded: the payload starts here
CHECKSUMS = ("none", "sum64", "crc32")
_EXTRA_KEYS = {"shared_storage_path", "checksum", "wait_for_save", "io_threads", "load_async"}
# Staging: host buffers of a chunk of blocks each, made once and reused (pinned on a GPU).
_CHUNK_BYTES = 256 << 20  # a chunk's bytes at most (and at least one block) ...
_CHUNK_BLOCKS = 1024  # ... and its blocks at most
_LOAD_BUFFERS = 2  # a chunk's files are read while the one before is copied to the device
_SAVE_BUFFERS = 8  # chunks copied out and not yet written; past that a save waits for the disk
_SAVE_RESERVE = 4  # made at start on a producer (pinned: 1 GiB of 8B-model KV, ~0.5 s)
_MAX_CHECKED = 1 << 17  # keys remembered as present (~20 MB of strings)


def chain_key(parent: Optional[str], tokens, extra) -> str:
    """A block's stable prefix key: sha256 over its parent's key, its token ids and the
    prefix cache's extra key (``repr``: strings, ints and tuples of them)."""
    h = hashlib.sha256()
    h.update((parent or "").encode())
    h.update(b"\x00" + ",".join(map(str, tokens)).encode())
    h.update(b"\x00" + repr(extra).encode())
    return h.hexdigest()


def adapter_identity(path: str) -> str:
    """A LoRA adapter as the connector's keys name it: a BLAKE2b digest of the contents of
    its ``adapter_config.json`` and weights file (as ``tessellm.lora.peft`` reads them). Its
    ``lora_int_id`` is no identity across engines (two engines may bind one id to other
    files); a digest of the contents is: the same adapter in any directory, under any name or
    id, shares KV, and another one never does. A directory without those files (the request
    fails to load it) is named by its real path."""
    h = hashlib.blake2b(digest_size=16)
    found = False
    for name in ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin"):
        file = os.path.join(path, name)
        try:
            with open(file, "rb") as f:
                h.update(b"\x00" + name.encode() + b"\x00")
                while chunk := f.read(1 << 24):
                    h.update(chunk)
        except OSError:
            continue
        found = found or name != "adapter_config.json"
        if name == "adapter_model.safetensors":
            break  # the .bin is read only without it
    if not found:
        return "path:" + os.path.realpath(path)
    return "files:" + h.hexdigest()


class SharedStorageConnector(KVConnectorBase):
    def __init__(self, config, role, context):
        super().__init__(config, role, context)
        extra = config.kv_connector_extra_config
        unknown = sorted(set(extra) - _EXTRA_KEYS)
        if unknown:
            raise ValueError(f"SharedStorageConnector's kv_connector_extra_config has unknown "
                             f"key(s) {unknown}; it reads {', '.join(sorted(_EXTRA_KEYS))}.")
        path = extra.get("shared_storage_path")
        if not isinstance(path, str) or not path:
            raise ValueError("SharedStorageConnector needs kv_connector_extra_config."
                             "shared_storage_path, the directory its KV files go in, e.g. "
                             "'{\"shared_storage_path\": \"/tmp/kv\"}'.")
        self.checksum = extra.get("checksum", "sum64")
        if self.checksum not in CHECKSUMS:
            raise ValueError(f"SharedStorageConnector's checksum must be one of {', '.join(CHECKSUMS)}, "
                             f"got {self.checksum!r}.")
        wait = extra.get("wait_for_save", False)
        load_async = extra.get("load_async", True)
        threads = extra.get("io_threads", min(8, os.cpu_count() or 1))
        if (not isinstance(wait, bool) or not isinstance(load_async, bool)
                or not isinstance(threads, int) or threads < 1):
            raise ValueError("SharedStorageConnector's wait_for_save and load_async are true or "
                             f"false and its io_threads a positive integer, got {wait!r}, "
                             f"{load_async!r} and {threads!r}.")
        self.wait_for_saves, self.load_async, self.io_threads = wait, load_async, threads
        self.root = os.path.join(path, context.namespace)
        try:
            os.makedirs(self.root, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"SharedStorageConnector cannot use shared_storage_path {path!r}: "
                             f"{exc.strerror or exc}; give a writable directory.") from None
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
        self._warned = False

    def path(self, key: str, rank: int) -> str:
        return os.path.join(self.root, f"{key}.r{rank}.kv")

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
        if not self.config.is_consumer:
            return 0, False
        bs = self.context.block_size
        keys = self.block_keys(request)
        n = 0
        for key in keys[num_computed_tokens // bs:(request.num_tokens - 1) // bs]:
            if key in self._checked:
                self._checked.move_to_end(key)
            elif all(self._loadable(key, r) for r in range(self.context.world_size)):
                self._checked[key] = None
                if len(self._checked) > _MAX_CHECKED:
                    self._checked.popitem(last=False)
            else:
                break
            n += 1
        return n * bs, self.load_async

    def _loadable(self, key: str, rank: int) -> bool:
        """The rank's file is there and exactly as long as a header and this engine's block
        (one ``stat``; the header and checksum are the worker's to check)."""
        path = self.path(key, rank)
        try:
            size = os.stat(path).st_size
        except OSError:
            return False
        if self.context.rank_block_bytes:
            return size == HEADER_BYTES + self.context.rank_block_bytes[rank]
        try:
            with open(path, "rb") as f:
                header = _parse_header(f.read(HEADER_BYTES))
        except (OSError, ValueError):
            return False
        return size == HEADER_BYTES + header[3]

    def update_state_after_alloc(self, request, block_ids, first_block, num_blocks):
        rid = request.request_id
        if num_blocks:
            keys = self._keys[rid]
            self._loads.append([rid, [[keys[i], int(block_ids[i])]
                                      for i in range(first_block, first_block + num_blocks)]])
            self.stats.blocks_loaded += num_blocks
        # What it holds from admission on is saved already (or was loaded from here).
        self._saved[rid] = max(self._saved.get(rid, 0), first_block + num_blocks)

    def build_connector_meta(self, scheduler_output, requests, block_ids) -> Optional[dict]:
        loads, self._loads = self._loads, []
        background = []
        if self.load_async:
            loads, background = [], loads
        saves, starts = [], {}
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
                saves += [[keys[i], int(ids[i])] for i in range(done, min(full, len(keys), len(ids)))]
                self._saved[rid] = full
                self._unsynced.add(rid)
            self.stats.blocks_saved += len(saves)
        # The step's outputs wait for the saves in flight when it samples a token for a request
        # that has any (its prompt's last chunk, or a decode): its response means its files.
        wait = False
        if self.wait_for_saves and self._unsynced:
            num = scheduler_output.num_scheduled_tokens
            for rid in [r for r in self._unsynced if r in num]:
                req = requests.get(rid)
                if req is None or starts.get(rid, 0) + num[rid] >= req.num_tokens:
                    self._unsynced.discard(rid)
                    wait = True
        if not loads and not background and not saves and not wait:
            return None
        return {"loads": loads, "async_loads": background, "saves": saves, "wait": wait}

    def request_failed_load(self, request) -> None:
        # The worker removed the bad file: later lookups miss it. The request itself is
        # recomputed without the connector; it saves what it computes afresh.
        for key in self._keys.get(request.request_id, ()):
            self._checked.pop(key, None)
        self._saved.pop(request.request_id, None)
        self._unsynced.discard(request.request_id)

    def request_finished(self, request) -> None:
        self._keys.pop(request.request_id, None)
        self._saved.pop(request.request_id, None)
        self._unsynced.discard(request.request_id)

    # -- worker half -----------------------------------------------------------------------

    def register_kv_caches(self, caches, swap_blocks, synchronize, device) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if getattr(self, "_readers", None) is not None:  # the cache allocated anew (sleep mode)
            self.wait_for_save()
            self.caches = caches  # same layout: the rest stays
            return
        torch = _torch()
        self.caches = caches
        self.swap_blocks = swap_blocks
        self.synchronize = synchronize
        self.nbytes = [t[0].numel() * t.element_size() for t in caches]
        self.block_bytes = sum(self.nbytes)
        self.offsets = [sum(self.nbytes[:i]) for i in range(len(caches))]
        layout = repr([[str(t.dtype), list(t.shape[1:])] for t in caches]).encode()
        self.layout = hashlib.blake2b(layout, digest_size=16).digest()
        self.device = device
        self.pin = device.type not in ("cpu", "xla")
        chunk = max(1, min(_CHUNK_BLOCKS, _CHUNK_BYTES // max(1, self.block_bytes)))
        # Host buffers kept for the engine's life (a fresh 1 GiB pinned buffer costs ~0.5 s of
        # cudaHostAlloc: that, not the files, was most of a slow load), a chunk of blocks each.
        self._load_staging = _Staging(chunk, self.block_bytes, _LOAD_BUFFERS, self.pin)
        self._save_staging = _Staging(chunk, self.block_bytes, _SAVE_BUFFERS, self.pin)
        if self.pin and self.config.is_consumer:
            self._load_staging.reserve(_LOAD_BUFFERS)  # at start, not in a request's TTFT
        if self.pin and self.config.is_producer:
            self._save_staging.reserve(_SAVE_RESERVE)
        # Streams of its own for the background loads' copies and the saves' (none on the cpu:
        # plain copies): neither waits for the other, nor the forward passes for them.
        self._stream, self._save_stream = _new_stream(torch, device), _new_stream(torch, device)
        self._readers = ThreadPoolExecutor(self.io_threads, thread_name_prefix="tessellm-kv-read")
        self._writers = ThreadPoolExecutor(self.io_threads, thread_name_prefix="tessellm-kv-write")
        self._writer = None  # runs each step's saves in order (its writes fan out to _writers)
        self._loader = None  # runs background loads in order (their reads fan out to _readers)
        self._pending: deque = deque()  # futures of saves not known written yet
        self._reads: deque = deque()  # (event, block ids) of saves' copies on the own stream
        # Background loads: request id -> None (under way), True (loaded), False (failed).
        self._load_status: dict = {}
        self._load_cond = threading.Condition()

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

    def start_load_kv(self, meta: dict) -> list:
        """The step's loads: ``loads`` (the step that admits them reads them: filled before its
        forward) and ``async_loads`` (started on the loader thread; ``get_finished_loads``
        says when they are in the cache)."""
        background = meta.get("async_loads") or []
        if background:
            torch = _torch()
            # The copies wait for the work queued so far (steps in flight may still write a
            # block these requests were given after it was freed), not for what comes later.
            after = None
            if self._stream is not None:
                after = torch.Event(device=self.device)
                after.record()
            if self._loader is None:
                from concurrent.futures import ThreadPoolExecutor

                self._loader = ThreadPoolExecutor(1, thread_name_prefix="tessellm-kv-load")
            with self._load_cond:
                for rid, _ in background:
                    self._load_status[rid] = None
            for rid, pairs in background:
                # ... and for saves' copies still reading a block it was given after a free
                blocks = {b for _, b in pairs}
                waits = [after] + [e for e, bs in self._reads if not bs.isdisjoint(blocks)]
                if self.device.type == "xla":  # lazy tensors are traced on the thread that
                    self._load_in_background(rid, pairs, None)  # steps: load here, done next step
                else:
                    self._loader.submit(self._load_in_background, rid, pairs,
                                        None if after is None else waits)
        loads = meta.get("loads") or []
        if not loads:
            return []
        items = [(key, block) for _, pairs in loads for key, block in pairs]
        bad = self._load(items, None, None)
        failed, start = [], 0
        for rid, pairs in loads:
            if bad.intersection(range(start, start + len(pairs))):
                failed.append(rid)
            start += len(pairs)
        return failed

    def _load_in_background(self, rid: str, pairs, after) -> None:
        """On the loader thread: the request's files into its blocks, on the connector's own
        stream (the forward passes go on meanwhile), then its status once the copies are done."""
        ok = False
        try:
            torch = _torch()
            # grad modes are thread-local: the cache may be inference tensors (written only in
            # inference mode) or not (xla's: an inference view of them cannot be written)
            inference = any(cache.is_inference() for cache in self.caches)
            with torch.inference_mode() if inference else torch.no_grad():
                ok = not self._load([tuple(p) for p in pairs], self._stream, after, wait=True)
        except Exception:  # noqa: BLE001 - a failed load is a recompute, never a dead engine
            logger.exception("KV load of request %s failed: it is recomputed.", rid)
        with self._load_cond:
            if rid in self._load_status:
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
        """``(key, block)`` pairs read from their files and copied into the blocks, a staging
        chunk at a time (the next chunk's files are read while the last one's copies run).
        ``stream``: the copies' stream (None: the current one); ``after``: events they wait
        for; ``wait``: return once the copies are done. Returns the indices that failed (their
        blocks may hold anything)."""
        torch = _torch()
        staging, bad = self._load_staging, set()
        last = None
        for lo in range(0, len(items), staging.chunk):
            chunk = items[lo:lo + staging.chunk]
            n = len(chunk)
            flat = staging.acquire()
            parts = self._parts(flat, n)
            mv = memoryview(flat.numpy())

            def read(run, chunk=chunk, parts=parts, mv=mv, n=n) -> list:  # a pool thread
                got = [self._read(chunk[i][0], self._views(mv, n, i)) for i in run]
                if any(g is not None and g[0] == 1 for g in got):
                    sums = _sum_parts(parts, run)
                    for j, g in enumerate(got):
                        if g is not None and g[0] == 1 and int(sums[j]) != g[1]:
                            self._drop(self.path(chunk[run[j]][0], self.context.rank), "checksum mismatch")
                            got[j] = None
                return [g is not None for g in got]

            oks = self._map(self._readers, read, n)
            del mv
            bad.update(lo + i for i, ok in enumerate(oks) if not ok)
            mapping = [(i, chunk[i][1]) for i, ok in enumerate(oks) if ok]
            event = None
            if mapping:
                if stream is not None:
                    with stream:
                        for event in after or ():
                            stream.wait_event(event)
                        after = None  # the stream keeps the order from here on
                        self._copy_in(parts, mapping)
                        event = torch.Event(device=self.device)
                        event.record(stream)
                else:
                    self._copy_in(parts, mapping)
                    event = _copies_done(torch, self.device)
            staging.release(flat, event)  # reused once its copies are done
            last = event or last
        if wait and last is not None:
            _wait_event(last)
        return bad

    def _copy_in(self, parts, mapping) -> None:
        for cache, part in zip(self.caches, parts):
            src = part.view(cache.dtype).view(part.shape[0], *cache.shape[1:])
            self.swap_blocks(src, cache, mapping)

    def _read(self, key: str, views: list) -> Optional[tuple]:
        """The rank's file of ``key`` into ``views``: (checksum kind, checksum) for a whole file
        of this key, rank and layout (a crc32 checked here; a sum64 by the caller, over all
        blocks at once), else None (the file removed unless it was missing)."""
        path = self.path(key, self.context.rank)
        try:
            fd = os.open(path, os.O_RDONLY)
            try:
                key_raw, rank, kind, nbytes, checksum, layout = _parse_header(os.pread(fd, HEADER_BYTES, 0))
                if (key_raw.rstrip(b"\0") != _key_bytes(key) or rank != self.context.rank
                        or layout != self.layout or nbytes != self.block_bytes or kind >= len(CHECKSUMS)):
                    raise ValueError("another key or layout")
                if os.fstat(fd).st_size != HEADER_BYTES + nbytes or _preadv(fd, views, HEADER_BYTES) != nbytes:
                    raise ValueError("wrong length")
            finally:
                os.close(fd)
            if kind == 2 and _crc32(views) != checksum:
                raise ValueError("checksum mismatch")
            return kind, checksum
        except FileNotFoundError:
            logger.warning("KV file %s is gone: the request is recomputed.", path)
        except (OSError, ValueError) as exc:
            self._drop(path, exc)
        return None

    @staticmethod
    def _drop(path: str, why) -> None:
        logger.warning("KV file %s not loaded (%s): removed; the request is recomputed.", path, why)
        try:
            os.unlink(path)  # nobody loads it again; a producer's next save writes it afresh
        except OSError:
            pass

    def save_kv(self, meta: dict):
        """Queue the copies of the blocks to save behind the step's forward, a staging chunk
        at a time, and hand each chunk to the writer thread: it waits for the chunk's copies
        (an event, not a stream sync: the host goes on launching the next step) and writes the
        files over its pool. Returns a future of every save so far when the metadata says the
        step's outputs wait (``wait``), else None (the writes go on behind later steps)."""
        torch = _torch()
        rank = self.context.rank
        saves = [(k, b) for k, b in (meta.get("saves") or ())
                 if not os.path.exists(self.path(k, rank))]
        staging, stream = self._save_staging, self._save_stream
        if saves and stream is not None:  # the copies wait for the step, the next step does not
            ready = torch.Event(device=self.device)
            ready.record()
            stream.wait_event(ready)
        for lo in range(0, len(saves), staging.chunk):
            chunk = saves[lo:lo + staging.chunk]
            n = len(chunk)
            flat = staging.acquire()  # waits for a writer when the disk is behind
            parts = self._parts(flat, n)
            mapping = [(b, i) for i, (_, b) in enumerate(chunk)]
            with stream if stream is not None else contextlib.nullcontext():
                for cache, part in zip(self.caches, parts):
                    self.swap_blocks(cache, part.view(cache.dtype).view(n, *cache.shape[1:]), mapping)
                event = _copies_done(torch, self.device, stream)
            if stream is not None:  # a later step writing one of these blocks waits for them
                self._reads.append((event, frozenset(b for _, b in chunk)))
            if self._writer is None:
                from concurrent.futures import ThreadPoolExecutor

                self._writer = ThreadPoolExecutor(1, thread_name_prefix="tessellm-kv-save")
            self._pending.append(self._writer.submit(self._write_chunk, chunk, flat, parts, event))
        while self._pending and self._pending[0].done():
            self._pending.popleft().result()
        if meta.get("wait") and self._pending:
            return self._pending[-1]  # one writer thread, in order: the last is the latest
        return None

    def _write_chunk(self, saves, flat, parts, event) -> None:
        try:
            if event is not None:
                _wait_event(event)  # the step's copies into the buffer are done
            n = len(saves)
            mv = memoryview(flat.numpy())

            def write(run) -> list:  # a pool thread: the run's sum64s in one pass, then the files
                sums = _sum_parts(parts, run) if self.checksum == "sum64" else None
                for j, i in enumerate(run):
                    self._write(saves[i][0], self._views(mv, n, i), None if sums is None else int(sums[j]))
                return []

            self._map(self._writers, write, n)
            del mv
        finally:
            self._save_staging.release(flat)

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
        if self._pending:
            self._pending[-1].result()

    def shutdown(self) -> None:
        # The saves under way are written first; background loads end (their blocks go away).
        for name in ("_loader", "_writer", "_writers", "_readers"):
            pool = getattr(self, name, None)
            if pool is not None:
                pool.shutdown(wait=True)
                setattr(self, name, None)

    def _write(self, key: str, views: list, sum64: Optional[int]) -> None:
        kind = CHECKSUMS.index(self.checksum)
        value = sum64 if kind == 1 else _crc32(views) if kind == 2 else 0
        header = _HEADER.pack(MAGIC, _key_bytes(key), self.context.rank, kind, self.block_bytes,
                              value, self.layout).ljust(HEADER_BYTES, b"\0")
        path = self.path(key, self.context.rank)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"  # one per writer thread
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                _writev(fd, [memoryview(header)] + views)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except OSError as exc:
            if not self._warned:  # a full disk: every later save would say the same
                logger.warning("KV file %s not saved (%s); later failures are not logged.", path, exc)
                self._warned = True
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _torch():
    import torch

    return torch


class _Staging:
    """Host buffers of ``chunk`` blocks each (pinned where the device pins), made at most
    ``limit`` times and reused for the engine's life. ``acquire`` takes a free one; when all
    are out it waits for the copies of the oldest busy one, or for a writer to give one back.
    ``release`` gives one back, busy until ``event`` (its copies) completes."""

    def __init__(self, chunk: int, block_bytes: int, limit: int, pin: bool):
        self.chunk, self.nbytes, self.limit, self.pin = chunk, chunk * block_bytes, limit, pin
        self.made = 0
        self.free: list = []
        self.busy: deque = deque()  # (buffer, event), oldest first
        self.cond = threading.Condition()

    def reserve(self, n: int) -> None:
        with self.cond:
            while self.made < min(n, self.limit):
                self.free.append(_host_empty((self.nbytes,), _torch().uint8, self.pin))
                self.made += 1

    def acquire(self):
        event = None
        with self.cond:
            while True:
                while self.busy and self.busy[0][1].query():
                    self.free.append(self.busy.popleft()[0])
                if self.free:
                    return self.free.pop()  # the warmest
                if self.made < self.limit:
                    self.made += 1
                    break
                if self.busy:
                    flat, event = self.busy.popleft()
                    break
                self.cond.wait()  # every buffer is with a writer
        if event is not None:
            _wait_event(event)
            return flat
        try:
            return _host_empty((self.nbytes,), _torch().uint8, self.pin)
        except BaseException:
            with self.cond:
                self.made -= 1
            raise

    def release(self, flat, event=None) -> None:
        with self.cond:
            if event is None:
                self.free.append(flat)
            else:
                self.busy.append((flat, event))
            self.cond.notify()


def _new_stream(torch, device):
    """A stream of the device's, or None (the cpu, xla, or a runtime without streams)."""
    if device.type in ("cpu", "xla"):
        return None
    try:
        return torch.Stream(device=device)
    except (RuntimeError, TypeError, ValueError):
        return None


def _copies_done(torch, device, stream=None):
    """An event recorded after the copies queued so far (on ``stream``, else the current
    stream), or None where they are done when the calls return: the cpu, and xla, whose
    host <-> device transfers are synchronous and which has no events."""
    if device.type in ("cpu", "xla"):
        return None
    event = torch.Event(device=device)
    event.record(stream)
    return event


def _wait_event(event) -> None:
    """The host waits for a device event (the GIL let go)."""
    event.synchronize()


def _sum_parts(parts, run: range):
    """The sum64 of each block of ``run`` over every cache tensor's part (uint8 ``[n, bytes]``
    tensors; numpy lets the GIL go, so the pool's threads sum in parallel)."""
    total = None
    for part in parts:
        s = _sum64(part.numpy()[run.start:run.stop])
        total = s if total is None else total + s  # uint64: modulo 2**64
    return total


def _preadv(fd: int, views: list, offset: int) -> int:
    """Bytes read from ``offset`` into ``views`` in order (fewer only at the end of the file)."""
    total = 0
    for g in range(0, len(views), 512):  # under IOV_MAX
        group = views[g:g + 512]
        got = os.preadv(fd, group, offset + total)
        total += got
        if got != sum(len(v) for v in group):
            break
    return total


def _writev(fd: int, views: list) -> None:
    """All of ``views`` written in order (a short write continues where it stopped)."""
    while views:
        group = views[:512]
        done = os.writev(fd, group)
        if done <= 0:
            raise OSError("writev wrote nothing")
        k = 0
        while k < len(group) and done >= len(group[k]):
            done -= len(group[k])
            k += 1
        views = views[k:]
        if done:
            views[0] = views[0][done:]


def _host_empty(shape, dtype, pin: bool):
    """A host buffer, pinned when asked and the runtime can (else pageable)."""
    import torch

    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)


def _parse_header(raw: bytes) -> tuple:
    """(key bytes, rank, checksum kind, payload bytes, checksum, layout digest)."""
    if len(raw) != HEADER_BYTES or raw[:len(MAGIC)] != MAGIC:
        raise ValueError("not a tessellm KV file of this version")
    return _HEADER.unpack_from(raw)[1:]


def _key_bytes(key: str) -> bytes:
    raw = key.encode()
    return raw if len(raw) <= 64 else hashlib.sha256(raw).hexdigest().encode()


def _crc32(parts) -> int:
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    return crc


def _sum64(rows):
    """Each row's (uint8 ``[n, bytes]`` numpy) sum of 64-bit words modulo 2**64 (bytes past a
    multiple of 8 add one by one)."""
    import numpy as np

    whole = rows.shape[1] // 8 * 8
    out = rows[:, :whole].view(np.uint64).sum(axis=1, dtype=np.uint64)
    if whole < rows.shape[1]:
        out += rows[:, whole:].sum(axis=1, dtype=np.uint64)
    return out


__all__ = ["SharedStorageConnector", "KVConnectorRole", "adapter_identity", "chain_key"]
