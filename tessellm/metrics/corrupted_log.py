"""The log line of corrupted requests: vLLM's ``Corrupted: N reqs`` (its periodic stats line, under
VLLM_COMPUTE_NANS_IN_LOGITS), here written only when there are some.

Requests whose logits held a NaN in some step are counted when they finish (as /metrics'
``corrupted_requests`` counts them). The first one is logged at once; later ones at most once an
interval (vLLM's stats interval, 10 s), the count since the last line, on the first batch of
outputs after the interval has passed (an engine gone idle writes its last count with its next
output; /metrics holds the exact total meanwhile).
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)

LOG_INTERVAL_S = 10.0  # vLLM's VLLM_LOG_STATS_INTERVAL default


class CorruptedLog:
    def __init__(self, interval_s: float = LOG_INTERVAL_S, clock: Callable[[], float] = time.monotonic):
        self.interval_s = interval_s
        self.clock = clock
        self.count = 0  # corrupted requests finished since the last line
        self.last: Optional[float] = None  # when the last line was written (None: never)

    def add(self) -> None:
        self.count += 1

    def maybe_log(self) -> None:
        """Write the line if there is a count and the interval since the last one has passed."""
        if not self.count:
            return
        now = self.clock()
        if self.last is not None and now - self.last < self.interval_s:
            return
        since = "since start" if self.last is None else f"in the last {now - self.last:.0f} s"
        logger.warning("Corrupted: %d reqs (their logits held a NaN; TESSELLM_COMPUTE_NANS_IN_LOGITS) %s",
                       self.count, since)
        self.count, self.last = 0, now
