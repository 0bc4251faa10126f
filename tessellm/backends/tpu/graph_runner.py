"""XLA compilation with bucketed shapes as the tpu backend's graph capture.

torch-xla records ops lazily and compiles one XLA program per distinct graph; inputs padded to
a few power-of-two batch buckets bound that to one program per bucket. ``capture`` runs the
step once per bucket and syncs (compiling and caching each program); ``run`` traces the same
ops again, which hits the cache, and executes::

    capture:  for size in buckets:  step(*make_inputs(size)); sync   -> compile, cache
    run(x):   step(*x); sync                                         -> cache hit, execute
"""

from __future__ import annotations

import bisect
from typing import Any, Callable, Optional, Sequence


def pow2_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    sizes, s = [], 1
    while s < max_num_seqs:
        sizes.append(s)
        s *= 2
    return tuple(sizes + [s])


def _xla_sync() -> None:
    import torch_xla

    sync = getattr(torch_xla, "sync", None)  # torch-xla >= 2.6
    if sync is not None:
        sync()
    else:
        import torch_xla.core.xla_model as xm

        xm.mark_step()


class XlaGraphRunner:
    name = "xla-buckets"

    def __init__(self, capture_sizes: Sequence[int]):
        self.capture_sizes = tuple(sorted(set(int(s) for s in capture_sizes)))
        self._step: Optional[Callable[..., Any]] = None

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        self._step = step
        for size in self.capture_sizes:
            step(*make_inputs(size))
            _xla_sync()

    def padded_size(self, num_tokens: int) -> Optional[int]:
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    def run(self, inputs: Sequence[Any]) -> Any:
        if self._step is None:
            raise RuntimeError("XlaGraphRunner.run before capture.")
        out = self._step(*inputs)
        _xla_sync()
        return out
