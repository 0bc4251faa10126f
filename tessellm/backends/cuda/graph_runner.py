"""CUDA graphs for the decode step, one per batch-size bucket, sharing one memory pool."""

from __future__ import annotations

import bisect
import contextlib
import logging
from typing import Any, Callable, Optional, Sequence

import torch

from tessellm.kernels.pdl import graph_scope, pdl_enabled

logger = logging.getLogger(__name__)


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every 8 up to 256 (then every 16): padding wastes at most a few rows."""
    sizes = [1, 2, 4] + list(range(8, min(max_num_seqs, 256) + 1, 8))
    sizes += list(range(272, max_num_seqs + 1, 16))
    return tuple(s for s in sizes if s <= max_num_seqs) or (1,)


class CudaGraphRunner:
    """Captures ``step(*inputs)`` per size with static input buffers; ``run`` copies in and replays.

    Captured largest first so smaller graphs reuse the pool the largest one allocated.

    ``torch.cuda.graph`` empties the caching allocator before every capture
    (``torch.cuda.empty_cache()`` in its ``__enter__``): the segments cached on the current
    stream before capture (those the memory profile's step left, which the KV cache was sized
    around) are allocated again after it, as they were, so the first real steps find them
    instead of growing the allocator (H100, workload F: +2.56 GiB in 9 segments in run 1;
    ``core/memory_profile.py``); so are a decode-overlap side stream's (``kept_segments``).
    """

    name = "cuda-graphs"
    # Each graph keeps its output as a static buffer: the engine's steps then write their
    # logits into one buffer every graph shares (core/runner_graphs.py), not one per graph.
    static_outputs = True

    def __init__(self, capture_sizes: Sequence[int]):
        self.capture_sizes = tuple(sorted(set(capture_sizes)))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple, Any]] = {}
        self._pool = None
        self.pool_bytes = 0  # the graphs' private pool after capture (the memory profile's check)

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        """On sm90+ (unless ``TESSELLM_PDL=0``) the Triton kernels of the capture chain each
        other through programmatic dependent launch (``pdl.py``), compiled by one warm-up on
        the current stream first."""
        stream = torch.cuda.Stream()
        kept = kept_segments()  # torch.cuda.graph empties the cache: cached again below
        for size in reversed(self.capture_sizes):
            inputs = make_inputs(size)
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                for _ in range(2):  # warm-up: JIT compiles, lazy workspaces allocate outside capture
                    step(*inputs)
            torch.cuda.current_stream().wait_stream(stream)
            with graph_scope():
                if pdl_enabled(inputs[0].device):  # the PDL variants compile outside capture
                    step(*inputs)
                    torch.cuda.synchronize()
                    stream.wait_stream(torch.cuda.current_stream())
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool, stream=stream):
                    out = step(*inputs)
            if self._pool is None:
                self._pool = graph.pool()
            self._graphs[size] = (graph, inputs, out)
        torch.cuda.synchronize()
        for on, sizes in kept:
            cache_again(sizes, on)
        self.pool_bytes = pool_bytes(self._pool)
        logger.info("Captured CUDA graphs for %d batch sizes (%d..%d) in a %.2f GiB pool",
                    len(self._graphs), self.capture_sizes[0], self.capture_sizes[-1],
                    self.pool_bytes / 2**30)

    def release(self) -> None:
        """Drop the graphs and their pool (sleep mode); ``capture`` may run again."""
        self._graphs.clear()
        self._pool = None

    def padded_size(self, num_tokens: int) -> Optional[int]:
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    def run(self, inputs: Sequence[Any]) -> Any:
        """An input may be narrower than its static buffer in trailing dims (a block table only
        as wide as this step needs): only that part is copied; the rest keeps stale values the
        step must not read."""
        size = inputs[0].shape[0]
        graph, static_inputs, out = self._graphs[size]
        for dst, src in zip(static_inputs, inputs):
            dst[tuple(slice(0, n) for n in src.shape)].copy_(src, non_blocking=True)
        graph.replay()
        return out


def kept_segments() -> list[tuple[Optional[Any], list[int]]]:
    """``cached_segments`` of the current stream (None) and of each decode-overlap side stream
    (``backends/cuda/streams.py``: an eager split step's side-stream blocks are that stream's)."""
    from tessellm.backends.cuda.streams import side_streams

    device = torch.cuda.current_device()
    sides = [s for s in side_streams() if s.device_index == device]
    return [(None, cached_segments())] + [(s, cached_segments(s)) for s in sides]


def cached_segments(stream=None) -> list[int]:
    """Sizes of the wholly free large segments the caching allocator holds on the current
    device and ``stream`` (default: the current one), in its default pool ([] where its
    snapshot reads otherwise)."""
    device = torch.cuda.current_device()
    stream = (stream if stream is not None else torch.cuda.current_stream()).cuda_stream
    try:
        return [seg["total_size"] for seg in torch.cuda.memory_snapshot()
                if seg["device"] == device and seg["stream"] == stream and seg["allocated_size"] == 0
                and seg["segment_type"] == "large"
                and tuple(seg.get("segment_pool_id", (0, 0))) == (0, 0)]
    except (KeyError, TypeError, RuntimeError) as e:  # (another torch's snapshot format)
        logger.warning("Allocator snapshot unreadable (%s): the segments graph capture frees "
                       "are not cached again.", e)
        return []


def cache_again(sizes: Sequence[int], stream=None) -> None:
    """Segments of these sizes cached again on ``stream`` (default: the current one; allocated
    together, then freed; each its own segment unless a cached block fits it). Out of memory: a
    warning, the steps allocate them."""
    held = []
    try:
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            for n in sorted(sizes, reverse=True):
                held.append(torch.empty(n, dtype=torch.uint8, device="cuda"))
    except torch.OutOfMemoryError:
        logger.warning("Could not cache %d of %d segments (%.2f GiB) again after graph capture; "
                       "the first steps will allocate them.", len(sizes) - len(held), len(sizes),
                       sum(sizes) / 2**30)
    del held


def pool_bytes(pool) -> int:
    """Bytes of the segments in the graphs' private pool ``pool`` (0: none)."""
    if pool is None:
        return 0
    device = torch.cuda.current_device()
    try:
        return sum(seg["total_size"] for seg in torch.cuda.memory_snapshot()
                   if seg["device"] == device and tuple(seg.get("segment_pool_id", (0, 0))) == tuple(pool))
    except (KeyError, TypeError, RuntimeError):  # (another torch's snapshot format)
        return 0
