"""Where a decode step's time goes at a given batch size (run on the GPU machine).

Phases on the host (schedule, runner: inputs + launch + sampler sync, scheduler update, output
processing) are timed with perf_counter, one synchronous step after another; then the engine's
own loop (``engine_*``: with async scheduling the host phases overlap the GPU). The GPU time of
the model step is timed with CUDA events around a graph replay, and a torch-profiler table of an
eager step lists its kernels. GPU idle per step = wall - GPU busy.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tessellm import LLM, SamplingParams
from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--quantization", default=None, help="e.g. fp8 (W8A16 / W8A8 weights)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, enable_prefix_caching=False,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    eng, core = llm.engine, llm.engine.core
    for i in range(args.batch):
        ids = [(7 * i + j) % 1000 + 10 for j in range(args.input_len)]
        eng.add_request(str(i), {"prompt_token_ids": ids},
                        SamplingParams(max_tokens=args.steps + 50, ignore_eos=True, temperature=0,
                                       output_kind=RequestOutputKind.FINAL_ONLY))
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    while core.in_flight:  # async scheduling leaves a step in flight: finish it first
        sched = core.in_flight.oldest()
        eng.outputs.process(core.scheduler.update(sched, core.executor.collect()))
    phases = {"schedule": 0.0, "runner": 0.0, "update": 0.0, "outputs": 0.0}
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a = time.perf_counter()
        sched = core.scheduler.schedule()
        b = time.perf_counter()
        res = core.runner.execute(sched)
        c = time.perf_counter()
        outs = core.scheduler.update(sched, res.sampled)
        d = time.perf_counter()
        eng.outputs.process(outs)
        e = time.perf_counter()
        for k, v in zip(phases, (b - a, c - b, d - c, e - d)):
            phases[k] += v
    wall = (time.perf_counter() - t0) / args.steps
    # The engine's own loop: with async scheduling step N+1 is launched before N's tokens are
    # read, so the host phases above overlap the GPU.
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        eng.step()
    torch.cuda.synchronize()
    engine_wall = (time.perf_counter() - t0) / args.steps
    # GPU time of one decode step: replay the captured graph for this batch size.
    gr = core.runner.graph_runner
    gpu_ms = None
    if gr is not None:
        size = gr.padded_size(args.batch)
        graph = gr._graphs[size][0]
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        graph.replay()
        start.record()
        for _ in range(20):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        gpu_ms = start.elapsed_time(end) / 20
    result = {"batch": args.batch, "wall_ms_per_step": round(wall * 1e3, 3),
              "graph_gpu_ms_per_step": gpu_ms and round(gpu_ms, 3),
              "gpu_idle_frac": gpu_ms and round(1 - gpu_ms / (wall * 1e3), 3),
              "async_scheduling": core.async_scheduling,
              "engine_wall_ms_per_step": round(engine_wall * 1e3, 3),
              "engine_gpu_idle_frac": gpu_ms and round(1 - gpu_ms / (engine_wall * 1e3), 3),
              **{f"host_{k}_ms": round(v / args.steps * 1e3, 3) for k, v in phases.items()}}
    print(json.dumps(result, indent=2))
    kernel_table(core)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


def kernel_table(core) -> None:
    """Kernel time of one eager decode step, grouped: attention, GEMMs, the rest."""
    from torch.profiler import ProfilerActivity, profile

    runner = core.runner
    ready, runner._graphs_ready = runner._graphs_ready, False
    sched = core.scheduler.schedule()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        res = runner.execute(sched)
        torch.cuda.synchronize()
    core.scheduler.update(sched, res.sampled)
    runner._graphs_ready = ready
    groups = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    for evt in prof.key_averages():
        us = evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
        name = evt.key.lower()
        if "decode" in name or "prefill" in name or "attention" in name or "cache" in name:
            groups["attention"] += us
        elif "gemm" in name or "cutlass" in name or "sm90" in name or "nvjet" in name or "matmul" in name:
            groups["gemm"] += us
        else:
            groups["other"] += us
    print("eager decode step kernel time (ms):", {k: round(v / 1e3, 3) for k, v in groups.items()})
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15))


if __name__ == "__main__":
    main()
