"""``OverlapStreams`` on CUDA: a side stream and the events between it and the current one.

Inside ``torch.cuda.graph`` capture the side stream joins the capture through the first event
it waits for (recorded on the capturing stream), and every side launch is waited for by the
capturing stream before the capture ends (``models/micro_batches.py`` waits for each one), so
the graph holds both streams' kernels with the events as its edges. Tensors the side stream
allocates come from the graph's pool (the caching allocator routes every stream of the capture
there). Outside capture (eager steps) the same calls order the two streams at run time.
"""

from __future__ import annotations

import contextlib

import torch


class CudaOverlapStreams:
    """``priority``: of the side stream (CUDA: lower is higher; 0 is the default's)."""

    def __init__(self, device: torch.device, priority: int = 0):
        self.stream = torch.cuda.Stream(device=device, priority=priority)

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.stream.device))
        return event

    @contextlib.contextmanager
    def side(self, after: torch.cuda.Event):
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            yield

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.stream.device).wait_event(event)


def overlap_streams() -> CudaOverlapStreams:
    """``Backend.overlap_streams`` of the cuda backend: on the process's current device."""
    return CudaOverlapStreams(torch.device("cuda", torch.cuda.current_device()))
