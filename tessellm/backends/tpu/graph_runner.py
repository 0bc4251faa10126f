"""The tpu backend's graph capture: every bucketed step shape compiled at start-up.

torch-xla records ops lazily and compiles one XLA program per distinct graph. The model runner
pads each step to the attention kernel's buckets (``tessellm/core/shape_buckets.py``), which
bounds a serving run to one program per (token bucket, sequence bucket, pure decode or not);
at capture time (``ModelRunner.capture_graphs``, before the engine says ready) it runs one
synthetic step of each shape class and syncs, so XLA compiles and caches them all::

    capture:  for counts in step_shapes(...):  step(counts); sync   -> compile, cache
    serve:    step(padded batch); sync                              -> cache hit, execute

``tessellm.core.shape_buckets.precompile_steps`` computes the shapes and steps them through
``precompile``, which counts the programs compiled.
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
    """The GraphRunner contract, XLA style: ``capture`` runs (and so compiles) the step once
    per size and ``run`` runs it again, which hits XLA's program cache. The model runner does
    not replay through it: it calls ``precompile`` with its step shapes and runs every step
    through its own bucketed path (core/shape_buckets.py)."""

    name = "xla-buckets"

    def __init__(self, max_num_seqs: int, capture_sizes: Optional[Sequence[int]] = None,
                 max_num_tokens: Optional[int] = None):
        self.max_num_seqs = int(max_num_seqs)
        self.max_num_tokens = max_num_tokens  # the step's token budget (set by the worker)
        self.capture_sizes = tuple(sorted({int(s) for s in capture_sizes or
                                           pow2_capture_sizes(self.max_num_seqs)}))
        self._step: Optional[Callable[..., Any]] = None
        self.shapes: list[list[int]] = []  # precompiled: per shape class, tokens per sequence
        self.compiled: Optional[int] = None  # XLA programs compiled by ``precompile``
        self.seconds = 0.0

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

    def precompile(self, step: Callable[[list[int]], None], shapes: list[list[int]]) -> None:
        """``step(counts)`` for each shape class, each cut into its program; counted."""
        from tessellm.metrics.compile_counter import xla_compile_count

        self.shapes = [list(c) for c in shapes]
        stats: dict = {}
        with xla_compile_count(stats):
            for counts in self.shapes:
                step(counts)
                _xla_sync()
        self.compiled, self.seconds = stats["compiled"], stats["seconds"]
