"""KV block residency, sampled (vLLM's ``--kv-cache-metrics``): how long KV blocks live, how
long they sit unused before their memory is taken for another, and how far apart their prefix
hits come. Off by default, as vLLM's.

Plain Python in the engine core's process; the ``BlockManager`` calls it where a block is taken
from the free queue and where a prefix hit takes one. A fraction ``sample_rate`` of the blocks
taken is followed (one ``random()`` per block taken, nothing per token)::

    taken (sampled) ---- hit ---- hit ---- hit ------------ taken again
                         |<-gap->|<-gap->|     (its memory goes to another prefix)
    |<--------------------------- lifetime --------------------------->|
                                          |<--------- idle ----------->|

When a followed block is taken again, its lifetime (taken to taken again), idle time (its last
use, taken or hit, to taken again) and the gaps between its last few hits (at most 3, as
vLLM's) become an event; the core sends the events with its stats and the front end observes
``kv_block_lifetime_seconds``, ``kv_block_idle_before_evict_seconds`` and
``kv_block_reuse_gap_seconds`` (tessellm.metrics.prometheus).
"""

from __future__ import annotations

import random
import time
from collections import deque
from typing import Optional

# vLLM's bounds for the three histograms (vllm/v1/metrics/loggers.py), seconds
RESIDENCY_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 30, 60,
                     120, 300, 600, 1200, 1800)
# Events kept between drains (an offline LLM drains them only at get_metrics()): the oldest go
# past this, so a long run that never reads its metrics keeps a bounded list.
MAX_EVENTS = 65536
_HITS_KEPT = 4  # vLLM's: the last 4 hits of a block, so at most 3 reuse gaps per event


def check_sample_rate(rate: float) -> float:
    if not 0 < rate <= 1:
        raise ValueError(f"kv_cache_metrics_sample must be in (0, 1] (the fraction of KV blocks "
                         f"followed, vLLM's --kv-cache-metrics-sample; default 0.01), got {rate!r}.")
    return rate


class KVResidency:
    """The followed blocks (block id -> [taken at, last used at, its last hits' times]) and the
    events of those taken again since the last ``drain``."""

    def __init__(self, sample_rate: float = 0.01, rng: Optional[random.Random] = None):
        self.sample_rate = check_sample_rate(sample_rate)
        self.random = (rng or random.Random()).random
        self.followed: dict[int, list] = {}
        self.events: deque = deque(maxlen=MAX_EVENTS)  # [lifetime, idle, [reuse gaps]] each

    def taken(self, block_id: int) -> None:
        """The block leaves the free queue for new contents: the end of its previous life (an
        event, if followed) and, sampled, the start of a new one."""
        if self.followed:
            self._ended(block_id)
        if self.random() < self.sample_rate:
            now = time.monotonic()
            self.followed[block_id] = [now, now, deque(maxlen=_HITS_KEPT)]

    def hit(self, block_id: int) -> None:
        """A prefix hit takes the block (its contents reused)."""
        state = self.followed.get(block_id)
        if state is not None:
            state[1] = time.monotonic()
            state[2].append(state[1])

    def reset(self) -> None:
        """The prefix cache was emptied (sleep, new weights): its blocks' lives end unrecorded."""
        self.followed.clear()
        self.events.clear()

    def drain(self) -> list[list]:
        """The events since the last call (sent with the core's stats)."""
        events = list(self.events)
        self.events.clear()
        return events

    def _ended(self, block_id: int) -> None:
        state = self.followed.pop(block_id, None)
        if state is None:
            return
        now = time.monotonic()
        born, last, hits = state
        self.events.append([now - born, now - last, [b - a for a, b in zip(hits, list(hits)[1:])]])
