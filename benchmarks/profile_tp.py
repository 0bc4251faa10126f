"""Where a tensor-parallel decode step's time goes (run on a multi-GPU machine).

Batch-1 decode of Llama-3.1-8B shapes (dummy weights): the engine core's wall time per step
split into schedule / submit+collect (the workers' step, over ZeroMQ) / update, the GPU time of
one captured decode graph replayed on every rank, and rank 0's torch-profiler table.

    python benchmarks/profile_tp.py -tp 2 [--batch 1] [--output-json out.json]

Steps run without async scheduling (one in flight, so the workers can be asked for the graph
timing between them). Under programmatic dependent launch a kernel's profiled time includes
its wait for the one before; run with TESSELLM_PDL=0 for per-kernel times.
"""

from __future__ import annotations

import argparse
import json
import time

from tessellm import LLM, SamplingParams
from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=2)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--output-json", default=None)
    p.add_argument("--trace", default=None, help="chrome trace path per rank, e.g. out/trace{rank}.json")
    args = p.parse_args()
    llm = LLM(args.model or None, load_format="dummy" if args.model else "auto", max_model_len=4096, enable_prefix_caching=False,
              async_scheduling=False, tensor_parallel_size=args.tensor_parallel_size)
    eng, core = llm.engine, llm.engine.core
    for i in range(args.batch):
        eng.add_request(str(i), {"prompt_token_ids": [(7 * i + j) % 1000 + 10 for j in range(512)]},
                        SamplingParams(max_tokens=3 * args.steps + 50, ignore_eos=True, temperature=0,
                                       output_kind=RequestOutputKind.FINAL_ONLY))
    while core.scheduler.waiting or any(r.num_output_tokens == 0 for r in core.scheduler.running):
        eng.step()
    for _ in range(5):
        eng.step()
    phases = {"schedule": 0.0, "submit": 0.0, "collect": 0.0, "update": 0.0}
    t0 = time.perf_counter()
    for _ in range(args.steps):
        a = time.perf_counter()
        sched = core.scheduler.schedule()
        b = time.perf_counter()
        core.executor.submit(sched)
        c = time.perf_counter()
        res = core.executor.collect()
        d = time.perf_counter()
        core.scheduler.update(sched, res.sampled)
        e = time.perf_counter()
        for k, v in zip(phases, (b - a, c - b, d - c, e - d)):
            phases[k] += v
    wall_ms = (time.perf_counter() - t0) / args.steps * 1e3
    graph_ms = core.executor.collective_rpc("time_decode_graph", args.batch)
    core.executor.collective_rpc("start_profile")
    for _ in range(10):
        eng.step()
    table = core.executor.collective_rpc("stop_profile", 25, args.trace)[0]
    result = {"tensor_parallel_size": args.tensor_parallel_size, "batch": args.batch,
              "wall_ms_per_step": round(wall_ms, 3),
              "phases_ms": {k: round(v / args.steps * 1e3, 3) for k, v in phases.items()},
              "graph_gpu_ms_per_rank": [round(g, 3) if g else g for g in graph_ms]}
    print(json.dumps(result, indent=1))
    print(table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({**result, "rank0_profile": table}, f, indent=1)
    llm.shutdown()


if __name__ == "__main__":
    main()
