"""The KV connectors' threads: pools of daemon threads, and whether a store counts as down.

A store that hangs (a dead NFS mount, a FUSE daemon gone) keeps every thread that asked it in
a system call that never returns. ``concurrent.futures.ThreadPoolExecutor`` joins its threads
when the interpreter exits, so one such thread would hold the process forever, whatever the
engine's shutdown did; ``DaemonPool``'s threads are daemons, and its ``shutdown`` waits a
bounded time. ``StoreHealth`` is the marker that keeps requests away from a store that hung or
failed: for a back-off period they do not ask it (a lookup answers "nothing", a save is
skipped), then a probe on a thread of its own asks it again.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
import weakref
from concurrent.futures import Future
from typing import Callable, Optional

logger = logging.getLogger(__name__)


class _PoolState:
    """What a pool's threads share with it (not the pool: a pool nobody holds any more is
    collected, and its threads end, as ``ThreadPoolExecutor``'s)."""

    def __init__(self):
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.idle = 0
        self.threads: list = []


def _work(state: _PoolState) -> None:
    while True:
        item = state.queue.get()
        if item is None:
            return
        future, fn, args = item
        if future.set_running_or_notify_cancel():
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                future.set_exception(exc)
            else:
                future.set_result(result)
        del future, fn, args, item
        with state.lock:
            state.idle += 1


def _end_threads(state: _PoolState) -> None:
    for _ in range(len(state.threads)):
        state.queue.put(None)


class DaemonPool:
    """Up to ``workers`` daemon threads named ``name``_N running submitted calls in order of
    submission (``submit`` and ``map`` as ``ThreadPoolExecutor``'s); threads start as work
    comes, and end once the pool is shut down or collected. ``shutdown`` waits at most
    ``timeout`` seconds for them; a thread still in a call then is left behind (a daemon: the
    process can exit)."""

    def __init__(self, workers: int, name: str):
        self.workers, self.name = max(1, workers), name
        self._state = _PoolState()
        self._closed = False
        weakref.finalize(self, _end_threads, self._state)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        state = self._state
        with state.lock:
            if self._closed:
                raise RuntimeError(f"{self.name}: submit after shutdown")
            state.queue.put((future, fn, args))
            if state.idle == 0 and len(state.threads) < self.workers:
                thread = threading.Thread(target=_work, args=(state,), daemon=True,
                                          name=f"{self.name}_{len(state.threads)}")
                state.threads.append(thread)
                thread.start()
            else:
                state.idle = max(0, state.idle - 1)
        return future

    def map(self, fn: Callable, items) -> list:
        """``fn`` over ``items`` on the pool; their results in order (raises the first error)."""
        return [f.result() for f in [self.submit(fn, item) for item in items]]

    def shutdown(self, wait: bool = True, cancel_futures: bool = False,
                 timeout: Optional[float] = None) -> list:
        """No more work; calls not started are cancelled (``cancel_futures``) or still run.
        ``wait``: join the threads, ``timeout`` seconds in all at most (None: no bound). Returns
        the threads still running a call (left behind)."""
        state = self._state
        with state.lock:
            if self._closed:
                return [t for t in state.threads if t.is_alive()]
            self._closed = True
            threads = list(state.threads)
        if cancel_futures:
            while True:
                try:
                    item = state.queue.get_nowait()
                except queue.Empty:
                    break
                if item is not None:
                    item[0].cancel()
        _end_threads(state)
        if wait:
            deadline = None if timeout is None else time.monotonic() + timeout
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return [t for t in threads if t.is_alive()]


class StoreHealth:
    """Whether a store counts as down: after a lookup that timed out, an I/O error of the
    store's (not a missing file), or a write hung past its bound, ``mark_down`` keeps it down
    for ``down_s`` seconds, during which ``down()`` is True and callers do not ask the store.
    The first ``down()`` after that starts ``probe`` on a thread of its own (never the caller's:
    the scheduler's or the step's); the store is up again once a probe returns without raising
    (a probe that raises or hangs keeps it down: one probe at a time, the next ``down_s``
    after a failed one). Each fall is logged once (warning) and counted (``falls``); the
    return once (info)."""

    def __init__(self, name: str, down_s: float, probe: Callable[[], None]):
        self.name, self.down_s, self._probe = name, down_s, probe
        self.falls = 0  # times marked down (from up)
        self._down = False
        self._until = 0.0
        self._probing = False
        self._lock = threading.Lock()
        self._pool: Optional[DaemonPool] = None
        self._closed = False

    @property
    def is_down(self) -> bool:
        return self._down

    def down(self) -> bool:
        """Whether to keep away from the store now (cheap: the caller's thread never waits).
        Past the back-off, starts a probe (if none is out)."""
        if not self._down:
            return False
        if time.monotonic() >= self._until and not self._probing and not self._closed:
            with self._lock:
                if (self._down and not self._probing and not self._closed
                        and time.monotonic() >= self._until):
                    self._probing = True
                    if self._pool is None:
                        self._pool = DaemonPool(1, "tessellm-kv-probe")
                    try:
                        self._pool.submit(self._run_probe)
                    except RuntimeError:  # shut down
                        self._probing = False
        return self._down

    def mark_down(self, why: str) -> None:
        """Down from now for ``down_s`` (already down: nothing; its probe decides)."""
        with self._lock:
            if self._down:
                return
            self._until = time.monotonic() + self.down_s
            self._down = True
            self.falls += 1
        logger.warning("KV store %s counts as down (%s): requests compute their prompts and "
                       "saves are skipped without asking it; a probe asks it again every %.1f s "
                       "(counted in store_down, lookups_skipped, saves_skipped; not logged per "
                       "request).", self.name, why, self.down_s)

    def _run_probe(self) -> None:
        ok, why = False, None
        try:
            self._probe()
            ok = True
        except Exception as exc:  # noqa: BLE001 - a failed probe: still down
            why = exc
        with self._lock:
            self._probing = False
            if ok:
                self._down = False
            else:
                self._until = time.monotonic() + self.down_s
        if ok:
            logger.info("KV store %s answers again: requests use it.", self.name)
        else:
            logger.debug("KV store %s still down (%s).", self.name, why)

    def close(self, wait: float = 0.0) -> None:
        """A probe under way is waited for ``wait`` seconds at most (it may hang on the
        store: a daemon, left behind)."""
        with self._lock:
            self._closed = True
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=wait > 0, cancel_futures=True, timeout=wait)
