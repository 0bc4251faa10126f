"""Kernel timing for benchmarks: GPU time per call from CUDA-graph replays.

A graph of ``reps`` back-to-back calls is replayed and timed with events, so launch overhead
stays out and only the kernels' time (their tails and gaps included) is measured. ``calls``
rotate, e.g. over copies of a weight so that the L2 cache cannot hold it between calls.
"""

from __future__ import annotations

import statistics
from typing import Callable, Sequence

import torch


def graph_time_us(calls: Sequence[Callable[[], object]], reps: int,
                  replays: int = 20) -> tuple[float, float]:
    """(median, min) microseconds per call over ``replays`` replays of a graph of ``reps``
    calls cycling through ``calls`` (each warmed up twice on the capture stream first)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            for fn in calls:
                fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for i in range(reps):
            calls[i % len(calls)]()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / reps)
    del graph
    return statistics.median(times), min(times)
