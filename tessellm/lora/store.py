"""The host-side adapter cache: parsed adapters, loaded by a background thread.

``ensure(lora)`` starts reading an adapter (once) and returns at once; the scheduler admits
its requests only once ``ready(id)``, so the step loop never waits on a disk. The cache keeps
the ``capacity`` (``--max-cpu-loras``) most recently used adapters; one evicted is read again
on next use.
"""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Optional

from tessellm.lora.peft import LoRAAdapter, load_adapter
from tessellm.lora.request import LoRARequest
from tessellm.lora.shapes import BaseShapes


class AdapterStore:
    def __init__(self, base: BaseShapes, max_rank: int, capacity: int):
        self.base = base
        self.max_rank = max_rank
        self.capacity = capacity
        self._lock = threading.Lock()
        self._cache: OrderedDict[int, LoRAAdapter] = OrderedDict()  # id -> adapter, LRU first
        self._loading: dict[int, Future] = {}
        self._errors: dict[int, str] = {}  # id -> why it failed to load
        self._named: dict[int, LoRARequest] = {}  # id -> the first request that named it
        self._pool: Optional[ThreadPoolExecutor] = None

    def claim(self, lora: LoRARequest) -> None:
        """Refuse an id already given to other files: the id keys every cache (this one, the
        slots, the prefix cache), so the second adapter would be served the first's weights
        and KV blocks. An id stays bound to its files after eviction (blocks may remain)."""
        with self._lock:
            first = self._named.setdefault(lora.lora_int_id, lora)
        if first.lora_path != lora.lora_path and not _same_dir(first.lora_path, lora.lora_path):
            raise ValueError(f"LoRA adapter {lora.lora_name!r} ({lora.lora_path}) has id "
                             f"{lora.lora_int_id}, which already names adapter "
                             f"{first.lora_name!r} ({first.lora_path}); give each adapter its "
                             "own lora_int_id.")

    def load_now(self, lora: LoRARequest) -> LoRAAdapter:
        """Read and check the adapter in this thread (raises ValueError) and cache it."""
        adapter = load_adapter(lora, self.base, self.max_rank)
        self._put(adapter)
        return adapter

    def ensure(self, lora: LoRARequest) -> None:
        """Start loading ``lora`` in the background unless it is cached, loading or failed."""
        with self._lock:
            key = lora.lora_int_id
            if key in self._cache or key in self._loading or key in self._errors:
                return
            if self._pool is None:
                self._pool = ThreadPoolExecutor(1, thread_name_prefix="tessellm-lora-load")
            self._loading[key] = self._pool.submit(self._load, lora)

    def _load(self, lora: LoRARequest) -> None:
        try:
            adapter = load_adapter(lora, self.base, self.max_rank)
        except Exception as exc:  # noqa: BLE001 - the request that needs it is told why
            with self._lock:
                self._errors[lora.lora_int_id] = str(exc)
                self._loading.pop(lora.lora_int_id, None)
            return
        self._put(adapter)

    def _put(self, adapter: LoRAAdapter) -> None:
        with self._lock:
            key = adapter.request.lora_int_id
            self._cache[key] = adapter
            self._cache.move_to_end(key)
            self._loading.pop(key, None)
            self._errors.pop(key, None)
            while len(self._cache) > self.capacity:
                self._cache.popitem(last=False)

    def ready(self, lora_id: int) -> bool:
        with self._lock:
            return lora_id in self._cache

    def error(self, lora_id: int) -> Optional[str]:
        with self._lock:
            return self._errors.get(lora_id)

    def forget_error(self, lora_id: int) -> None:
        with self._lock:
            self._errors.pop(lora_id, None)

    def get(self, lora: LoRARequest) -> LoRAAdapter:
        """The cached adapter (most recently used now); read in this thread if it was evicted."""
        with self._lock:
            adapter = self._cache.get(lora.lora_int_id)
            if adapter is not None:
                self._cache.move_to_end(lora.lora_int_id)
                return adapter
        return self.load_now(lora)

    def evict(self, lora_id: int) -> None:
        with self._lock:
            self._cache.pop(lora_id, None)
            self._errors.pop(lora_id, None)

    def wait_any(self, timeout: float) -> None:
        """Block up to ``timeout`` for a background load to finish (an idle engine waits
        here instead of spinning)."""
        with self._lock:
            futures = list(self._loading.values())
        if futures:
            from concurrent.futures import FIRST_COMPLETED, wait

            wait(futures, timeout, return_when=FIRST_COMPLETED)

    def shutdown(self) -> None:
        """End the loader thread: a load under way finishes on its own, queued ones are dropped
        and forgotten. A later ``ensure`` makes a new thread, as the first one did (lazily), and
        reads a dropped adapter again; the cache and the ids' bindings stay."""
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.shutdown(wait=False, cancel_futures=True)
        with self._lock:  # (a load that ran pops its own entry when it is done)
            self._loading = {k: f for k, f in self._loading.items() if not f.cancelled()}


def _same_dir(a: str, b: str) -> bool:
    """The same directory however it is spelled (trailing slash, "..", a symlink)."""
    return os.path.realpath(a) == os.path.realpath(b)
