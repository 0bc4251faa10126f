"""``tessellm bench latency``: one request at a time: time to first token and ms per output token."""

from __future__ import annotations

import dataclasses
import os
import json
import statistics
import time

from tessellm.entrypoints.bench_throughput import add_sampling_argument, make_requests, sampling_params
from tessellm.entrypoints.engine_args import add_engine_arguments, engine_args_from


def add_arguments(p) -> None:
    p.add_argument("--model", default=None)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--num-iters", type=int, default=5)
    p.add_argument("--output-json", default=None)
    add_sampling_argument(p)
    p.add_argument("--lora-path", default=None, help="a PEFT adapter every request uses (needs --enable-lora)")
    add_engine_arguments(p, enable_prefix_caching=False)  # each iteration's prompt is computed


def run(args) -> int:
    from tessellm import LLM

    if args.data_parallel_size > 1:  # refused before N engine cores start
        raise SystemExit("tessellm bench latency times one request at a time on one engine core; "
                         "--data-parallel-size does not apply. Time -dp N with `tessellm bench "
                         "throughput -dp N` or `tessellm bench serve` against `tessellm serve -dp N`.")
    params = sampling_params(args, args.output_len)  # a bad --sampling-params: before the load
    llm = LLM(**dataclasses.asdict(engine_args_from(args, args.model)))
    lora = None
    if args.lora_path:
        from tessellm.lora import LoRARequest

        lora = LoRARequest(os.path.basename(args.lora_path.rstrip("/")), 1, args.lora_path)
    ttfts, tpots = measure(llm, args.input_len, args.output_len, args.num_iters, args.seed, lora, params)
    core = llm.engine.core
    result = {"device": core.backend.name, "input_len": args.input_len, "output_len": args.output_len,
              "ttft_ms_median": round(statistics.median(ttfts) * 1e3, 2),
              "tpot_ms_median": round(statistics.median(tpots) * 1e3, 3),
              "ttft_ms": [round(t * 1e3, 2) for t in ttfts], "tpot_ms": [round(t * 1e3, 3) for t in tpots],
              "graphs": core.executor.worker_info[0]["graphs"], "lora": args.lora_path,
              "sampling_params": args.sampling_params,
              "async_scheduling": core.async_scheduling,
              "tensor_parallel_size": args.tensor_parallel_size,
              "pipeline_parallel_size": args.pipeline_parallel_size,
              "spec_decode": core.scheduler.spec_stats.as_dict() if args.speculative_config else None}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


def measure(llm, input_len: int, output_len: int, num_iters: int, seed: int = 0, lora=None,
            params=None):
    """Batch-1 runs (after one warm-up): lists of TTFT and time per output token, in seconds.
    ``params``: the requests' SamplingParams (default greedy, ``output_len`` tokens, EOS ignored)."""
    from tessellm import SamplingParams

    engine, core = llm.engine, llm.engine.core
    final_only, engine.outputs.final_only = engine.outputs.final_only, False  # watch 1st token
    params = params or SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
    ttfts, tpots = [], []
    try:
        for it in range(num_iters + 1):
            req = make_requests(1, input_len, output_len, 0.0, core.vocab_size, seed + it)[0]
            if core.parallel.world_size == 1:  # workers return only finished steps
                core.backend.synchronize()
            start = time.perf_counter()
            engine.add_request(f"latency-{it}", {"prompt_token_ids": req.prompt_token_ids}, params, lora)
            first = None
            while engine.has_unfinished_requests():
                for out in engine.step():
                    if first is None and out.outputs[0].token_ids:
                        first = time.perf_counter()
            end = time.perf_counter()
            if it:
                ttfts.append(first - start)
                tpots.append((end - first) / (output_len - 1))
    finally:
        engine.outputs.final_only = final_only
    return ttfts, tpots
