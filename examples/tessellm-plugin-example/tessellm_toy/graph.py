"""The toy backend's graph capture: ``torch.compile`` with the "eager" backend, one trace per
batch-size bucket (dynamo records the step's graph and replays it under shape guards). It
shows the GraphRunner contract end to end on a CPU; it is not claimed to be faster."""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional, Sequence


class ToyCompiledGraphRunner:
    name = "toy-torch-compile"

    def __init__(self, capture_sizes: Sequence[int]):
        self.capture_sizes = tuple(sorted(set(int(s) for s in capture_sizes)))
        self._compiled: Optional[Callable[..., Any]] = None

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        import torch

        self._compiled = torch.compile(step, backend="eager", dynamic=False)
        for size in self.capture_sizes:
            self._compiled(*make_inputs(size))

    def padded_size(self, num_tokens: int) -> Optional[int]:
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    def run(self, inputs: Sequence[Any]) -> Any:
        if self._compiled is None:
            raise RuntimeError("run() before capture().")
        return self._compiled(*inputs)
