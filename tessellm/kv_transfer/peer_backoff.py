"""Which producers a consumer does not ask for now (``ZmqPeerConnector``): a producer rank that
did not answer is left alone for ``seconds`` (``store_down_ms``), per ``host:port``. Plain
Python, thread-safe (the lookup threads and a rank's reader threads share it).

Invariant: bounded. Every entry is marked for the same ``seconds``, so the order entries were
last marked in is the order they expire in::

    oldest mark ............................................ newest mark
    | a: until t1 | b: until t2 | ... | z: until tn |      t1 <= t2 <= ... <= tn

Each mark drops the expired entries from the old end (amortized O(1)), and past ``max_entries``
the oldest too (it is asked again a little early: one more lookup's timeout). An xPyD consumer
whose requests name many producers that come and go (or a client naming a fresh port each time,
where ``allowed_producers`` lets it) holds at most the addresses that failed within
``seconds``, and never more than ``max_entries``.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict

_MAX_ENTRIES = 1024  # producer ranks held down at once at most


class PeerBackoff:
    def __init__(self, seconds: float, max_entries: int = _MAX_ENTRIES, clock=time.monotonic):
        self.seconds, self.max_entries, self._clock = seconds, max_entries, clock
        self._until: OrderedDict[str, float] = OrderedDict()  # address -> until when (see above)
        self._lock = threading.Lock()

    def mark(self, address: str) -> None:
        """``address`` did not answer: not asked for ``seconds`` from now."""
        now = self._clock()
        with self._lock:
            self._until[address] = now + self.seconds
            self._until.move_to_end(address)
            while self._until and (len(self._until) > self.max_entries
                                   or next(iter(self._until.values())) <= now):
                self._until.popitem(last=False)

    def down(self, address: str) -> bool:
        """``address`` is not to be asked now."""
        with self._lock:
            return self._clock() < self._until.get(address, 0.0)

    def clear(self, address: str) -> None:
        """``address`` answered: asked again from now."""
        with self._lock:
            self._until.pop(address, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._until)
