"""GPU timing helpers shared by the kernel probes (GPU only; imported, never run).

* ``gtime``: microseconds of GPU time per call, from CUDA-graph replays (``graph_ms``: the
  call captured ``reps`` times in one graph, the median replay over ``reps``), so host launch
  costs are out; ``flush=True`` writes a 256 MB buffer before each call (L2 flush) and
  subtracts that buffer's own time.
* ``eager_us``: wall time per call run eagerly back to back (host launch costs included).
* ``events_ms``: mean milliseconds per call between two CUDA events around back-to-back calls.
* ``capture_graph``: a CUDA graph of ``reps`` back-to-back calls (after one warm-up call).
* ``run_sections``: each named section into ``DIR/<section>.json``; a failing section keeps
  its error and the others still run.

Users: gpuperf_probe.py, decode_chain.py, moe_decode_probe.py (this folder) and
benchmarks/spec_verify_cost.py.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path
from typing import Callable, Optional

import torch

_FLUSH = None


def _flush_buf():
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(64 * 2**20, dtype=torch.int32, device="cuda")  # 256 MB
    return _FLUSH


def capture_graph(body, reps: int) -> torch.cuda.CUDAGraph:
    """``body`` once (warm-up), then a graph of ``reps`` calls of it."""
    body()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            body()
    return g


def graph_ms(body, reps: int) -> float:
    """Milliseconds per call: the median of 7 replays of a graph of ``reps`` calls, over ``reps``."""
    g = capture_graph(body, reps)
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(7):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / reps)
    del g
    return statistics.median(times)


def gtime(fn, reps: int = 20, flush: bool = False) -> float:
    """Microseconds of GPU time per call of ``fn`` (see the module docstring)."""
    fn()
    torch.cuda.synchronize()
    if not flush:
        return graph_ms(fn, reps) * 1e3
    buf = _flush_buf()

    def body():
        buf.fill_(1)
        fn()

    return (graph_ms(body, reps) - graph_ms(lambda: buf.fill_(1), reps)) * 1e3


def eager_us(fn, iters: int = 5) -> float:
    """Wall time per call of ``fn`` run eagerly back to back (host launch costs included)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters * 1e6


def events_ms(fn, iters: int) -> float:
    """Mean milliseconds per call of ``fn`` on the current stream (after 3 warm-up calls)."""
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def run_sections(out: Path, names: list[str], sections: dict[str, Callable[[dict], None]],
                 deadline: float = float("inf"), start: Optional[float] = None,
                 partial: Optional[list] = None) -> None:
    """Run each of ``names`` into ``out/<name>.json`` (its dict, plus the device and the
    seconds it took). A section started more than ``deadline`` seconds after ``start`` is
    skipped; ``partial`` (a list) holds ``[path, dict]`` of the running section, for a probe
    that saves results as they come."""
    start = time.perf_counter() if start is None else start
    for name in names:
        if time.perf_counter() - start > deadline:
            print("skipped (deadline):", name, flush=True)
            continue
        res = {"device": torch.cuda.get_device_name()}
        if partial is not None:
            partial[:] = [out / f"{name}.json", res]
        t0 = time.perf_counter()
        try:
            sections[name](res)
        except Exception as e:  # noqa: BLE001 - keep the other sections
            res["error"] = f"{type(e).__name__}: {e}"[:300]
            print(name, "failed:", res["error"], flush=True)
        res["seconds"] = round(time.perf_counter() - t0, 1)
        (out / f"{name}.json").write_text(json.dumps(res, indent=1))
        print(f"== {name} done in {res['seconds']} s", flush=True)
