"""``OverlapStreams`` on one stream: the side work runs where it is queued, in order.

What a backend without ``Backend.overlap_streams`` gets (the cpu backend, an emulated one): the
decode micro-batch overlap (``core/decode_overlap.py``) then runs the same split schedule
sequentially, which is how its numerics are tested on the host (``tests/core/test_decode_overlap.py``).
"""

from __future__ import annotations

import contextlib


class SequentialStreams:
    """Every event is None: queued work is already in order."""

    def record(self) -> None:
        return None

    def side(self, after) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def wait(self, event) -> None:
        return None
