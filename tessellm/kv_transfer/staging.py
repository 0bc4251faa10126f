"""Host staging buffers and the device's streams and events, as the KV connectors' worker
halves use them (the cpu and xla have neither streams nor events: their copies are done when
the calls return)."""

from __future__ import annotations

import threading
from collections import deque


def torch_module():
    import torch

    return torch


class Staging:
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
                self.free.append(host_empty((self.nbytes,), torch_module().uint8, self.pin))
                self.made += 1

    def acquire(self, give_up=None, wait: bool = True):
        """A buffer. ``give_up``: when every buffer is with a writer, asked every 50 ms while
        waiting for one; True ends the wait and returns None (the writers hang). ``wait``
        False: None at once when every buffer is with a writer (one busy with copies is
        still waited for)."""
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
                if not wait:
                    return None
                if give_up is None:
                    self.cond.wait()  # every buffer is with a writer
                elif not self.cond.wait(0.05) and give_up():
                    return None
        if event is not None:
            wait_event(event)
            return flat
        try:
            return host_empty((self.nbytes,), torch_module().uint8, self.pin)
        except BaseException:
            with self.cond:
                self.made -= 1
            raise

    def lose(self, flat) -> None:
        """A buffer that threads hung in a store's call may still write into is never given
        out again: it no longer counts, so a later ``acquire`` makes another (it is freed once
        those threads let it go)."""
        with self.cond:
            self.made -= 1
            self.cond.notify()

    def release(self, flat, event=None) -> None:
        with self.cond:
            if event is None:
                self.free.append(flat)
            else:
                self.busy.append((flat, event))
            self.cond.notify()


def new_stream(torch, device):
    """A stream of the device's, or None (the cpu, xla, or a runtime without streams)."""
    if device.type in ("cpu", "xla"):
        return None
    try:
        return torch.Stream(device=device)
    except (RuntimeError, TypeError, ValueError):
        return None


def copies_done(torch, device, stream=None):
    """An event recorded after the copies queued so far (on ``stream``, else the current
    stream), or None where they are done when the calls return: the cpu, and xla, whose
    host <-> device transfers are synchronous and which has no events."""
    if device.type in ("cpu", "xla"):
        return None
    event = torch.Event(device=device)
    event.record(stream)
    return event


def wait_event(event) -> None:
    """The host waits for a device event (the GIL let go)."""
    event.synchronize()


def host_empty(shape, dtype, pin: bool):
    """A host buffer, pinned when asked and the runtime can (else pageable)."""
    import torch

    if pin:
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    return torch.empty(shape, dtype=dtype)
