"""Device-graph capture through torch's graph API, shared by the rocm and xpu backends
(``torch.cuda.CUDAGraph`` is HIP graphs on ROCm).

One graph per batch-size bucket, all sharing one memory pool, captured largest first so the
pool is sized by the largest. Static buffers: each bucket keeps the tensors ``make_inputs(size)``
returned; ``run`` copies the caller's inputs into them and replays::

    capture:  for size in [max .. 1]:  inputs = make_inputs(size); warm up; record step(*inputs)
    run(x):   size = len(x[0]);  static[size] <- x;  graph[size].replay();  -> static_out[size]

``static_out[size]`` is what the step returned while captured: the engine's steps return rows
of one logits buffer every graph shares (``static_outputs``, core/runner_graphs.py), so the
graphs keep one logits buffer between them, not one each.

The same code drives CUDA graphs on NVIDIA (it is torch's one graph API), which is where it has
actually run (see docs/plugins.md, "What ran where").
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional, Sequence


def default_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """1, 2, 4, 8, then every multiple of 16, up to max_num_seqs (which is always included)."""
    ladder = [s for s in (1, 2, 4, 8) if s < max_num_seqs]
    ladder += list(range(16, max_num_seqs, 16))
    return tuple(sorted(set(ladder + [max_num_seqs])))


class TorchDeviceGraphRunner:
    """``GraphRunner`` on torch's device graph API: ``torch.cuda.CUDAGraph`` (HIP graphs on
    ROCm, CUDA graphs on NVIDIA) or, with ``device_api="xpu"``, ``torch.xpu.XPUGraph`` where
    the installed torch has it (the same API shape)."""

    warmup_runs = 2  # eager runs per bucket before capture (lazy allocations, autotuning)
    static_outputs = True  # the engine's steps then share one logits buffer (runner_graphs.py)

    def __init__(self, capture_sizes: Sequence[int], device_api: str = "cuda",
                 name: str = "hip-graphs"):
        if not capture_sizes:
            raise ValueError("A graph runner needs at least one capture size.")
        self.name = name
        self.device_api = device_api
        self.capture_sizes = tuple(sorted(set(int(s) for s in capture_sizes)))
        self._graphs: dict[int, tuple[Any, tuple, Any]] = {}  # size -> (graph, inputs, output)

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        import torch

        api = getattr(torch, self.device_api)
        graph_cls = api.CUDAGraph if self.device_api == "cuda" else api.XPUGraph
        pool = None
        stream = api.Stream()
        for size in reversed(self.capture_sizes):
            inputs = tuple(make_inputs(size))
            stream.wait_stream(api.current_stream())
            with api.stream(stream):
                for _ in range(self.warmup_runs):
                    step(*inputs)
            api.current_stream().wait_stream(stream)
            graph = graph_cls()
            with api.graph(graph, pool=pool, stream=stream):
                output = step(*inputs)
            pool = graph.pool()
            self._graphs[size] = (graph, inputs, output)
        api.synchronize()

    def release(self) -> None:
        """Drop the graphs and their pool (sleep mode); ``capture`` may run again."""
        self._graphs.clear()

    def padded_size(self, num_tokens: int) -> Optional[int]:
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    def run(self, inputs: Sequence[Any]) -> Any:
        size = int(inputs[0].shape[0])
        if size not in self._graphs:
            raise ValueError(f"No graph was captured for batch size {size}; pad to "
                             f"padded_size() (captured: {self.capture_sizes}).")
        graph, static, output = self._graphs[size]
        if len(inputs) != len(static):
            raise ValueError(f"Expected {len(static)} inputs, got {len(inputs)}.")
        for dst, src in zip(static, inputs):
            if dst is not src:
                dst.copy_(src, non_blocking=True)
        graph.replay()
        return output
