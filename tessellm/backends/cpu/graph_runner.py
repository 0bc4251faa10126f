"""The cpu backend's graph capture: the decode step compiled by ``torch.compile`` (inductor).

Inductor turns the step into C++ loops (fused RMSNorm/rotary/SiLU, the cache write) around
oneDNN GEMMs, and one guard check replaces ~30 Python op dispatches per layer. What is compiled
and when::

    capture(step, make_inputs):
      batch 1                 -> graph A (dynamo always specialises a size of 1)
      batch 2, dims symbolic  -> graph B: any batch >= 2, any block-table width
      every other bucket, with recompiles forbidden (one let through, see _reuses_graph):
        all ran on graph B    -> exact sizes: padded_size(n) = n, no padding rows at all
        two needed a compile  -> the step specialises on its batch size (e.g. host lists of
                                 that length): compile one graph per bucket, pad to buckets
    run(inputs): pad the block table to >= 2 columns, call the compiled step

Invariant: ``run`` never compiles: every size ``padded_size`` can return was called in
``capture``, and block tables are never 1 column wide (dynamo would specialise that width).
Inputs are not copied into static buffers: compiled code takes fresh tensors each call.
"""

from __future__ import annotations

import bisect
import logging
import time
from typing import Any, Callable, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

_MIN_TABLE_WIDTH = 2


def cpu_capture_sizes(max_num_seqs: int) -> tuple[int, ...]:
    """Powers of two up to ``max_num_seqs``, and it: the buckets used when the step cannot run
    at exact sizes (each is called once in ``capture``, so few of them keep capture short)."""
    sizes, s = [], 1
    while s < max_num_seqs:
        sizes.append(s)
        s *= 2
    return tuple(sizes + [max_num_seqs])


class CompiledDecodeRunner:
    """``GraphRunner`` for the cpu backend: ``torch.compile`` of the decode step.

    ``exact_sizes`` is True once capture has shown one graph serves every batch size >= 2;
    ``compile_seconds`` is what capture took. ``options``: inductor options, passed through.
    """

    name = "torch-compile"

    def __init__(self, capture_sizes: Sequence[int], options: Optional[dict] = None):
        self.capture_sizes = tuple(sorted(set(int(s) for s in capture_sizes)))
        self.options = dict(options or {})
        self.exact_sizes = False
        self.compile_seconds = 0.0
        self._compiled: Optional[Callable[..., Any]] = None

    def capture(self, step: Callable[..., Any], make_inputs: Callable[[int], tuple]) -> None:
        t0 = time.perf_counter()
        compiled = torch.compile(step, dynamic=None, options=self.options or None)
        first = [s for s in self.capture_sizes if s <= 2] or [self.capture_sizes[0]]
        rest = [s for s in self.capture_sizes if s not in first]
        with torch._dynamo.config.patch(recompile_limit=len(self.capture_sizes) + 8,
                                        automatic_dynamic_shapes=False):
            for size in first:
                compiled(*_marked(make_inputs(size), symbolic_batch=size > 1))
            self.exact_sizes = self._reuses_graph(compiled, rest, make_inputs)
            if not self.exact_sizes:
                for size in rest:
                    compiled(*_marked(make_inputs(size), symbolic_batch=False))
        self._compiled = compiled
        self.compile_seconds = time.perf_counter() - t0
        logger.info("Compiled the cpu decode step in %.1fs: %s", self.compile_seconds,
                    "one graph for batch 1, one for any batch >= 2" if self.exact_sizes else
                    f"one graph per bucket {self.capture_sizes}")

    def release(self) -> None:
        """Drop the compiled step (sleep mode); ``capture`` compiles it again."""
        self._compiled = None

    def padded_size(self, num_tokens: int) -> Optional[int]:
        if self.exact_sizes and self.capture_sizes[0] <= num_tokens <= self.capture_sizes[-1]:
            return num_tokens
        i = bisect.bisect_left(self.capture_sizes, num_tokens)
        return self.capture_sizes[i] if i < len(self.capture_sizes) else None

    def run(self, inputs: Sequence[Any]) -> Any:
        if self._compiled is None:
            raise RuntimeError("CompiledDecodeRunner.run before capture.")
        *rest, table = inputs
        return self._compiled(*rest, _wide_enough(table))

    @staticmethod
    def _reuses_graph(compiled, sizes: list[int], make_inputs) -> bool:
        """Call ``sizes`` with recompiles forbidden. One recompile is let through (a graph from
        inductor's on-disk cache can carry the batch-size range of an earlier process, e.g.
        ``n <= 64``); True when every later size then ran without one, False when a second
        size needed a compile (the step specialises on its batch size)."""
        recompiled = verified = False
        for size in sizes:
            try:
                with torch.compiler.set_stance("fail_on_recompile"):
                    compiled(*_marked(make_inputs(size), symbolic_batch=True))
                verified = recompiled
                continue
            except RuntimeError as exc:  # a real error in the step raises again when compiled
                if recompiled:
                    logger.info("The cpu decode step specialises on its batch size; compiling "
                                "one graph per bucket. %s", exc)
                    return False
                recompiled = True
            compiled(*_marked(make_inputs(size), symbolic_batch=True))
        return verified or not recompiled

def _wide_enough(table: torch.Tensor) -> torch.Tensor:
    if table.shape[1] >= _MIN_TABLE_WIDTH:
        return table
    return torch.nn.functional.pad(table, (0, _MIN_TABLE_WIDTH - table.shape[1]))


def _marked(inputs: Sequence[torch.Tensor], symbolic_batch: bool) -> tuple:
    """The inputs with dim 0 marked symbolic (or static) and the block table's (last input's)
    width symbolic; ``maybe``: a step that needs a constant may still specialise it."""
    *rest, table = inputs
    table = _wide_enough(table)
    for t in (*rest, table):
        if symbolic_batch:
            torch._dynamo.maybe_mark_dynamic(t, 0)
        else:
            torch._dynamo.mark_static(t, 0)
    torch._dynamo.maybe_mark_dynamic(table, 1)
    return (*rest, table)
