"""benchmarks/firstrun.py with the allocator read around the graph capture (one GPU).

Before and after ``capture_graphs`` (the KV cache is allocated by then): the caching
allocator's reserved bytes and segments, and after it the graphs' one logits buffer
(``ModelRunner.graph_logits``, core/runner_graphs.py), their pool and the reserve the KV cache
was sized around (``graph_memory_estimate``). Then firstrun.py goes on as usual (memory profile
line with the KV blocks, F run by run: reserved before -> after, segments +n). Arguments are
firstrun.py's::

    python3 benchmarks/graphlogits_start.py --model benchmarks/model-configs/llama-3.1-8b \
        --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --label f090

Output lines start ``[capture]``.
"""

from __future__ import annotations

import runpy
import sys

import torch

from tessellm.core.runner_graphs import RunnerGraphs

GIB = 2**30


def _stats() -> tuple[float, int]:
    s = torch.cuda.memory_stats() if torch.cuda.is_available() else {}  # (a CPU dry run: 0)
    return s.get("reserved_bytes.all.current", 0) / GIB, s.get("segment.all.current", 0)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _patch() -> None:
    capture = RunnerGraphs.capture_graphs

    def capture_graphs(self):
        _sync()
        reserved, segments = _stats()
        print(f"[capture] before: reserved {reserved:.2f} GiB in {segments} segments", flush=True)
        capture(self)
        _sync()
        after, after_segments = _stats()
        logits = self.graph_logits
        pool = getattr(self.graph_runner, "pool_bytes", 0) if self.graph_runner is not None else 0
        print(f"[capture] after:  reserved {after:.2f} GiB in {after_segments} segments "
              f"(+{after - reserved:.2f} GiB, +{after_segments - segments} segments)"
              f" | logits buffer {tuple(logits.shape) if logits is not None else None} "
              f"{(logits.nbytes if logits is not None else 0) / GIB:.3f} GiB, pool {pool / GIB:.2f}"
              f" GiB, reserve {self.graph_memory_estimate() / GIB:.2f} GiB", flush=True)

    RunnerGraphs.capture_graphs = capture_graphs


if __name__ == "__main__":
    _patch()
    sys.argv = ["benchmarks/firstrun.py", *sys.argv[1:]]
    runpy.run_path("benchmarks/firstrun.py", run_name="__main__")
