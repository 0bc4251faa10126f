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
               the prefix cache's extra key: cache salt, LoRA adapter, images)

    file:  b"TSLKV\\x00\\x01\\n" | u32 header length (little-endian) | header (JSON) | payload
    header: {"key", "rank", "tensors": [[dtype, block shape], ...], "nbytes", "crc32"}
    payload: the block of every cache tensor of the rank, in order, raw bytes

Files are written to a temporary name and renamed: a reader sees a whole file or none. A file
that is missing, truncated, of another layout or whose checksum fails is a miss: the scheduler
checks each rank's header and size before it counts a block as loadable; the worker checks the
rest when it loads, and a failure there makes the request recompute (``base.py``) and removes
the file (a producer's next save of that block writes it afresh). Nothing else is ever
deleted: the directory grows until someone clears it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import zlib
from collections import OrderedDict
from typing import Optional

from tessellm.kv_transfer.base import KVConnectorBase, KVConnectorRole

logger = logging.getLogger(__name__)

MAGIC = b"TSLKV\x00\x01\n"
_PREFIX = len(MAGIC) + 4
_EXTRA_KEYS = {"shared_storage_path"}
_MAX_CHECKED = 1 << 17  # keys remembered as present (~20 MB of strings)


def chain_key(parent: Optional[str], tokens, extra) -> str:
    """A block's stable prefix key: sha256 over its parent's key, its token ids and the
    prefix cache's extra key (``repr``: strings, ints and tuples of them)."""
    h = hashlib.sha256()
    h.update((parent or "").encode())
    h.update(b"\x00" + ",".join(map(str, tokens)).encode())
    h.update(b"\x00" + repr(extra).encode())
    return h.hexdigest()


class SharedStorageConnector(KVConnectorBase):
    def __init__(self, config, role, context):
        super().__init__(config, role, context)
        extra = config.kv_connector_extra_config
        unknown = sorted(set(extra) - _EXTRA_KEYS)
        if unknown:
            raise ValueError(f"SharedStorageConnector's kv_connector_extra_config has unknown "
                             f"key(s) {unknown}; it reads only 'shared_storage_path'.")
        path = extra.get("shared_storage_path")
        if not isinstance(path, str) or not path:
            raise ValueError("SharedStorageConnector needs kv_connector_extra_config."
                             "shared_storage_path, the directory its KV files go in, e.g. "
                             "'{\"shared_storage_path\": \"/tmp/kv\"}'.")
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
        # Keys whose files every rank has, checked (LRU): a request retried while the cache is
        # full, or a hot prefix, is not checked file by file again. A file that goes away
        # after the check fails its load on the worker: a recompute, never a wrong token.
        self._checked: OrderedDict[str, None] = OrderedDict()
        self._warned = False

    def path(self, key: str, rank: int) -> str:
        return os.path.join(self.root, f"{key}.r{rank}.kv")

    # -- scheduler half --------------------------------------------------------------------

    def block_keys(self, request) -> list[str]:
        """The request's keys, one per full block of its known tokens (extended as it grows)."""
        keys = self._keys.setdefault(request.request_id, [])
        tokens, bs = request.all_token_ids, self.context.block_size
        while (len(keys) + 1) * bs <= len(tokens):
            i = len(keys)
            keys.append(chain_key(keys[-1] if keys else None, tokens[i * bs:(i + 1) * bs],
                                  request.block_key(i * bs, (i + 1) * bs)))
        return keys

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> int:
        if not self.config.is_consumer:
            return 0
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
        return n * bs

    def _loadable(self, key: str, rank: int) -> bool:
        """The rank's file is there, of this key and rank, and exactly as long as its header
        and this engine's block say (the checksum is the worker's to check)."""
        path = self.path(key, rank)
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                size = os.fstat(f.fileno()).st_size
        except (OSError, ValueError):
            return False
        want = self.context.rank_block_bytes[rank] if self.context.rank_block_bytes else None
        return (header.get("key") == key and header.get("rank") == rank
                and (want is None or header.get("nbytes") == want)
                and size == _PREFIX + header["_len"] + header.get("nbytes", -1))

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
        saves = []
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
            self.stats.blocks_saved += len(saves)
        if not loads and not saves:
            return None
        return {"loads": loads, "saves": saves}

    def request_failed_load(self, request) -> None:
        # The worker removed the bad file: later lookups miss it. The request itself is
        # recomputed without the connector; it saves what it computes afresh.
        for key in self._keys.get(request.request_id, ()):
            self._checked.pop(key, None)
        self._saved.pop(request.request_id, None)

    def request_finished(self, request) -> None:
        self._keys.pop(request.request_id, None)
        self._saved.pop(request.request_id, None)

    # -- worker half -----------------------------------------------------------------------

    def register_kv_caches(self, caches, swap_blocks, synchronize, device) -> None:
        self.caches = caches
        self.swap_blocks = swap_blocks
        self.synchronize = synchronize
        self.tensors = [[str(t.dtype).replace("torch.", ""), list(t.shape[1:])] for t in caches]
        self.nbytes = [t[0].numel() * t.element_size() for t in caches]
        self.device = device
        self._writer = None  # the thread that writes saved blocks' files, made on the first save
        self._last_save = None
        self._loading: list = []  # (event, pinned buffers) of loads the device may still read

    def start_load_kv(self, meta: dict) -> list:
        import numpy as np

        loads = meta.get("loads") or []
        if not loads:
            return []
        total = sum(self.nbytes)
        rows = np.empty((sum(len(b) for _, b in loads), total), dtype=np.uint8)
        blocks, failed, n = [], [], 0
        for rid, pairs in loads:
            ok = all(self._read(key, rows[n + i]) for i, (key, _) in enumerate(pairs))
            if not ok:
                failed.append(rid)
                continue
            blocks += [block for _, block in pairs]
            n += len(pairs)
        if n:
            self._copy_in(rows[:n], blocks)
        return failed

    def _read(self, key: str, row) -> bool:
        """The rank's file of ``key`` into ``row`` (uint8, this rank's block bytes); False for
        anything but a whole, matching, intact file."""
        path = self.path(key, self.context.rank)
        try:
            with open(path, "rb") as f:
                header = _read_header(f)
                if (header.get("key") != key or header.get("rank") != self.context.rank
                        or header.get("tensors") != self.tensors or header.get("nbytes") != row.size):
                    raise ValueError("another layout")
                if f.readinto(memoryview(row)) != row.size or f.read(1):
                    raise ValueError("wrong length")
            if zlib.crc32(row) != header.get("crc32"):
                raise ValueError("checksum mismatch")
            return True
        except FileNotFoundError:
            logger.warning("KV file %s is gone: the request is recomputed.", path)
            return False
        except (OSError, ValueError) as exc:
            logger.warning("KV file %s not loaded (%s): removed; the request is recomputed.", path, exc)
            try:
                os.unlink(path)  # nobody loads it again; a producer's next save writes it afresh
            except OSError:
                pass
            return False

    def _copy_in(self, rows, blocks: list[int]) -> None:
        """Each cache tensor's part of ``rows`` into the device blocks. Where the device pins,
        through pinned buffers kept until an event behind the copies completes (no host
        sync: the step in flight keeps running); else a sync before the rows go away."""
        import torch

        mapping, n = list(enumerate(blocks)), len(blocks)
        pin = self.device.type not in ("cpu", "xla")
        src, off, hosts = torch.from_numpy(rows), 0, []
        for cache, nb in zip(self.caches, self.nbytes):
            host = _host_empty((n, nb), torch.uint8, pin)
            host.copy_(src[:, off:off + nb])
            self.swap_blocks(host.view(cache.dtype).view(n, *cache.shape[1:]), cache, mapping)
            hosts.append(host)
            off += nb
        if pin and all(h.is_pinned() for h in hosts):
            event = torch.Event(device=self.device)
            event.record()
            self._loading = [(e, h) for e, h in self._loading if not e.query()] + [(event, hosts)]
        else:
            self.synchronize()  # pageable buffers (or the cpu backend): done before they go

    def save_kv(self, meta: dict):
        """Queue the copies of the blocks to save behind the step's forward (into pinned host
        memory where the device pins), then hand the rest to a writer thread: it waits for the
        copies (an event, not a stream sync: the host goes on launching the next step) and
        writes the files. Returns the thread's future (the worker waits for it before the
        step's outputs leave it), or None when there is nothing to save."""
        import torch

        rank = self.context.rank
        saves = [(k, b) for k, b in (meta.get("saves") or ())
                 if not os.path.exists(self.path(k, rank))]
        if not saves:
            return None
        n, mapping = len(saves), [(b, i) for i, (_, b) in enumerate(saves)]
        pin = self.device.type not in ("cpu", "xla")
        hosts = []
        for cache in self.caches:
            host = _host_empty((n, *cache.shape[1:]), cache.dtype, pin)
            pin = pin and host.is_pinned()
            self.swap_blocks(cache, host, mapping)
            hosts.append(host)
        if pin and all(h.is_pinned() for h in hosts):
            event = torch.Event(device=self.device)
            event.record()
            ready = event.synchronize
        else:
            self.synchronize()  # pageable copies (or the cpu backend): done when this returns
            ready = None
        if self._writer is None:
            from concurrent.futures import ThreadPoolExecutor

            self._writer = ThreadPoolExecutor(1, thread_name_prefix="tessellm-kv-save")
        self._last_save = self._writer.submit(self._write_all, saves, hosts, ready)
        return self._last_save

    def _write_all(self, saves, hosts, ready) -> None:
        import numpy as np
        import torch

        if ready is not None:
            ready()  # the step's copies into ``hosts`` are done
        n = len(saves)
        rows = np.concatenate([h.view(torch.uint8).reshape(n, -1).numpy() for h in hosts], axis=1)
        for (key, _), row in zip(saves, rows):
            self._write(key, row)

    def wait_for_save(self) -> None:
        if self._last_save is not None:  # one writer thread, in order: the last is the latest
            self._last_save.result()

    def shutdown(self) -> None:
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None

    def _write(self, key: str, row) -> None:
        header = json.dumps({"key": key, "rank": self.context.rank, "tensors": self.tensors,
                             "nbytes": int(row.size), "crc32": zlib.crc32(row)}).encode()
        path = self.path(key, self.context.rank)
        tmp = f"{path}.tmp{os.getpid()}.{threading.get_ident()}"  # one per writer thread
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + len(header).to_bytes(4, "little") + header)
                f.write(memoryview(row))
            os.replace(tmp, path)
        except OSError as exc:
            if not self._warned:  # a full disk: every later save would say the same
                logger.warning("KV file %s not saved (%s); later failures are not logged.", path, exc)
                self._warned = True
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _host_empty(shape, dtype, pin: bool):
    """A host buffer, pinned when asked and the runtime can (else pageable)."""
    import torch

    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)


def _read_header(f) -> dict:
    head = f.read(_PREFIX)
    if len(head) != _PREFIX or head[:len(MAGIC)] != MAGIC:
        raise ValueError("not a tessellm KV file")
    n = int.from_bytes(head[len(MAGIC):], "little")
    if n > 1 << 20:
        raise ValueError("header too long")
    raw = f.read(n)
    if len(raw) != n:
        raise ValueError("truncated header")
    header = json.loads(raw)
    if not isinstance(header, dict):
        raise ValueError("bad header")
    header["_len"] = n
    return header


__all__ = ["SharedStorageConnector", "KVConnectorRole", "chain_key"]
