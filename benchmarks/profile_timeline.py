"""Per-step timeline of an offline run (workload F by default): where does the time go?

The workload runs twice on one engine: first with other prompts (seed 1) as a warm-up, so every
kernel variant its steps meet is compiled, then measured. The measured run is the engine's own
loop (async scheduling on, as ``bench throughput`` runs it); each ``schedule()`` call is stamped,
and the time from one to the next is charged to that step's kind: mixed (prefill chunks present)
or pure decode. Per class: steps, seconds, tokens, ms per step, to set against the floors.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

from tessellm import LLM, SamplingParams
from tessellm.sampling_params import RequestOutputKind  # FINAL_ONLY: steps build no per-step outputs
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
    for seed in (1, 0):  # 1: warm-up on other prompts (no prefix-cache hits), 0: measured
        reqs = make_requests(args.num_prompts, args.input_len, args.output_len, 0.0,
                             core.vocab_size, seed)
        stamps = run_stamped(eng, core, reqs, f"s{seed}-")
    stats = {"mixed": [0, 0.0, 0], "decode": [0, 0.0, 0]}  # steps, seconds, tokens
    for (t, kind, tokens), (t_next, _, _) in itertools.pairwise(stamps):
        s = stats[kind]
        s[0] += 1
        s[1] += t_next - t
        s[2] += tokens
    start = stamps[0][0]
    total = stamps[-1][0] - start
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


def run_stamped(eng, core, reqs, prefix: str) -> list[tuple[float, str, int]]:
    """Run ``reqs`` through the engine's loop; one ``(time, kind, tokens)`` per schedule() call
    that scheduled work, and a last stamp when the loop ends."""
    schedule, stamps = core.scheduler.schedule, []

    def stamped():
        sched = schedule()
        if sched.total_num_scheduled_tokens:
            n = sched.num_scheduled_tokens.values()
            kind = "decode" if all(x == 1 for x in n) else "mixed"
            stamps.append((time.perf_counter(), kind, sched.total_num_scheduled_tokens))
        return sched

    for i, r in enumerate(reqs):
        eng.add_request(f"{prefix}{i}", {"prompt_token_ids": r.prompt_token_ids},
                        SamplingParams(max_tokens=r.output_len, ignore_eos=True, temperature=0,
                                       output_kind=RequestOutputKind.FINAL_ONLY))
    core.backend.synchronize()
    core.scheduler.schedule = stamped
    try:
        while eng.has_unfinished_requests():
            eng.step()
        core.backend.synchronize()
    finally:
        core.scheduler.schedule = schedule
    stamps.append((time.perf_counter(), "end", 0))
    return stamps


if __name__ == "__main__":
    main()
