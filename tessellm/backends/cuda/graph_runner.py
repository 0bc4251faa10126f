"""CUDA graphs for the decode step, one per batch-size bucket, sharing one memory pool."""

from __future__ import annotations

import bisect
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
    """

    name = "cuda-graphs"

    def __init__(self, capture_sizes: Sequence[int]):
        self.capture_sizes = tuple(sorted(set(capture_sizes)))
        self._graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple, Any]] = {}
        self._pool = None

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        """On sm90+ (unless ``TESSELLM_PDL=0``) the Triton kernels of the capture chain each
        other through programmatic dependent launch (``pdl.py``), compiled by one warm-up on
        the current stream first."""
        stream = torch.cuda.Stream()
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
        logger.info("Captured CUDA graphs for %d batch sizes (%d..%d)", len(self._graphs),
                    self.capture_sizes[0], self.capture_sizes[-1])

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
