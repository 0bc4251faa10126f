"""Device memory in use, for the metrics: sampled in the core process, at most once a second.

What "in use" means per backend:

* an accelerator (``memory_info`` given): ``total - free`` as the backend reports it. That is
  device-wide (other processes on the card count too), and it includes the KV cache, which the
  engine allocates up front: it shows how full the card is, not how busy the engine is.
* ``cpu``: the system's free/total would count every process on the host, so the cpu backend
  reports the engine core process's resident set size (weights + KV cache + activations), read
  from ``/proc/self/statm``; total is the host's physical memory. Where there is no
  ``/proc`` (not Linux) the value is None and the gauge is left out.
* a backend with no ``memory_info``, or no backend (the model runs in worker processes, under
  tensor or pipeline parallelism): None.

The backend call can cost tens of microseconds on some drivers, so it is not made every step.
"""

from __future__ import annotations

import os
import time
from typing import Optional

from tessellm.backends.spec import Backend

_STATM = "/proc/self/statm"


def process_rss_bytes() -> Optional[int]:
    """Resident set size of this process, or None where ``/proc`` is missing."""
    try:
        with open(_STATM) as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class DeviceMemoryProbe:
    """``sample()`` -> (used_bytes, total_bytes), each None when unknown; cached for ``interval_s``."""

    def __init__(self, backend: Optional[Backend], interval_s: float = 1.0):
        self.backend = backend
        self.interval_s = interval_s
        self._last_time = -float("inf")
        self._last: tuple[Optional[int], Optional[int]] = (None, None)

    def sample(self) -> tuple[Optional[int], Optional[int]]:
        now = time.monotonic()
        if now - self._last_time >= self.interval_s:
            self._last_time = now
            self._last = self._read()
        return self._last

    def _read(self) -> tuple[Optional[int], Optional[int]]:
        try:
            return self._read_backend()
        except Exception:  # noqa: BLE001 - a metric must never take the engine down
            return None, None

    def _read_backend(self) -> tuple[Optional[int], Optional[int]]:
        if self.backend is None:
            return None, None
        info = self.backend.memory_info
        if self.backend.device_type == "cpu":
            return process_rss_bytes(), (int(info()[1]) if info is not None else None)
        if info is None:
            return None, None
        free, total = info()
        return int(total - free), int(total)
