"""Per-step timeline of an offline run (workload F by default): where does the time go?

Classifies each engine step as mixed (prefill chunks present) or pure decode and sums wall
time per class, so prefill and decode costs can be compared with their physical floors.
"""

from __future__ import annotations

import argparse
import json
import time

from tessellm import LLM, SamplingParams
from tessellm.entrypoints.bench_throughput import make_requests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    p.add_argument("--num-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--quantization", default=None, help="e.g. fp8 (W8A16 / W8A8 weights)")
    p.add_argument("--kv-cache-dtype", default="auto", help="auto or fp8")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    llm = LLM(args.model, load_format="dummy", max_model_len=4096,
              max_num_batched_tokens=args.max_num_batched_tokens,
              quantization=args.quantization, kv_cache_dtype=args.kv_cache_dtype)
    eng, core = llm.engine, llm.engine.core
    reqs = make_requests(args.num_prompts, args.input_len, args.output_len, 0.0, core.vocab_size, 0)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs[:2]],
                 SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    for i, r in enumerate(reqs):
        eng.add_request(f"r{i}", {"prompt_token_ids": r.prompt_token_ids},
                        SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0))
    stats = {"mixed": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # steps, seconds, tokens
    core.backend.synchronize()
    start = time.perf_counter()
    while eng.has_unfinished_requests():
        t = time.perf_counter()
        sched = core.scheduler.schedule()
        res = core.runner.execute(sched)
        outs = core.scheduler.update(sched, res.sampled)
        eng.outputs.process(outs)
        kind = "decode" if all(n == 1 for n in sched.num_scheduled_tokens.values()) else "mixed"
        s = stats[kind]
        s[0] += 1
        s[1] += time.perf_counter() - t
        s[2] += sched.total_num_scheduled_tokens
    total = time.perf_counter() - start
    out_tokens = sum(r.output_len for r in reqs)
    result = {"total_s": round(total, 3), "output_tok_per_s": round(out_tokens / total, 1),
              **{f"{k}_steps": v[0] for k, v in stats.items()},
              **{f"{k}_s": round(v[1], 3) for k, v in stats.items()},
              **{f"{k}_ms_per_step": round(v[1] / max(v[0], 1) * 1e3, 2) for k, v in stats.items()},
              **{f"{k}_tokens": v[2] for k, v in stats.items()}}
    print(json.dumps(result, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
