"""Where workload C's time goes on the CPU (issue 22): the whole workload run step by step with
the host phases timed (schedule, runner, scheduler update, output processing), the steps split
into pure decode / with prefill, and a torch-profiler op table of a few steps.

    PYTHONPATH=. python benchmarks/profile_cpu_c.py [--max-num-seqs 256] [--profile-steps 5]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tessellm import LLM, SamplingParams
from tessellm.entrypoints.bench_throughput import make_requests


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-num-batched-tokens", type=int, default=None)
    p.add_argument("--profile-steps", type=int, default=0, help="op table of this many decode steps")
    p.add_argument("--profile-mixed", action="store_true",
                   help="profile mixed (prefill) steps instead of decode steps of >= 32 sequences")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: all)")
    p.add_argument("--prefault", action="store_true",
                   help="write the whole KV cache once before the run (page faults out of the timing)")
    p.add_argument("--output-json", default=None)
    args = p.parse_args()
    start = time.perf_counter()
    llm = LLM(dtype="float32", max_num_seqs=args.max_num_seqs,
              max_num_batched_tokens=args.max_num_batched_tokens)
    eng, core = llm.engine, llm.engine.core
    reqs = make_requests(64, 136, 136, 0.8824, core.vocab_size, 7)
    warm = make_requests(2, 16, 4, 0.0, core.vocab_size, 8)
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warm],
                 SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    if args.prefault:
        for a in core.runner.model.attention_layers():
            a.k_cache.zero_()
            a.v_cache.zero_()
    startup = time.perf_counter() - start  # engine start-up and a first tiny generate
    for i, r in enumerate(reqs):
        eng.add_request(str(i), {"prompt_token_ids": r.prompt_token_ids},
                        SamplingParams(max_tokens=r.output_len, temperature=0, ignore_eos=True))
    kinds = {"decode": [0, 0.0, 0], "mixed": [0, 0.0, 0]}  # steps, seconds, tokens
    phases = {"schedule": 0.0, "runner": 0.0, "update": 0.0, "outputs": 0.0}
    out_tokens = 0
    by_batch: dict[int, list] = {}  # largest batch in the bucket -> [steps, seconds, tokens]
    prof_left = args.profile_steps
    prof = None
    t0 = time.perf_counter()
    steps = 0
    while (core.scheduler.running or core.scheduler.waiting) and (not args.max_steps or steps < args.max_steps):
        steps += 1
        a = time.perf_counter()
        sched = core.scheduler.schedule()
        b = time.perf_counter()
        decode_only = all(n == 1 for n in sched.num_scheduled_tokens.values())
        wanted = (not decode_only) if args.profile_mixed else (
            decode_only and len(sched.num_scheduled_tokens) >= 32)
        if wanted and prof_left and prof is None:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)
            prof.__enter__()
        res = core.runner.execute(sched)
        c = time.perf_counter()
        if prof is not None:
            prof_left -= 1
            if not prof_left:
                prof.__exit__(None, None, None)
                table = prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=25)
                prof_done = prof
                prof = False
        outs = core.scheduler.update(sched, res.sampled)
        d = time.perf_counter()
        results, _ = eng.outputs.process(outs)
        e = time.perf_counter()
        k = kinds["decode" if decode_only else "mixed"]
        k[0] += 1
        k[1] += e - a
        k[2] += sum(sched.num_scheduled_tokens.values())
        if decode_only:  # decode steps by batch size: 1-8, 9-16, 17-32, 33-64, 65+
            n = len(sched.num_scheduled_tokens)
            bucket = next(b for b in (8, 16, 32, 64, 1 << 30) if n <= b)
            by_batch.setdefault(bucket, [0, 0.0, 0])
            by_batch[bucket][0] += 1
            by_batch[bucket][1] += e - a
            by_batch[bucket][2] += n
        for name, v in zip(phases, (b - a, c - b, d - c, e - d)):
            phases[name] += v
    wall = time.perf_counter() - t0
    out_tokens = sum(r.output_len for r in reqs)
    result = {"startup_s": round(startup, 1), "wall_s": round(wall, 2), "output_tok_per_s": round(out_tokens / wall, 1),
              "phases_s": {k: round(v, 2) for k, v in phases.items()},
              "steps": {k: {"n": v[0], "s": round(v[1], 2), "tokens": v[2],
                            "ms_per_step": round(v[1] / max(v[0], 1) * 1e3, 1)} for k, v in kinds.items()},
              "decode_by_batch": {f"<={k}": {"n": v[0], "s": round(v[1], 2), "mean_batch": round(v[2] / v[0], 1),
                                             "ms_per_step": round(v[1] / v[0] * 1e3, 1)}
                                  for k, v in sorted(by_batch.items())},
              "load": open("/proc/loadavg").read().split()[:3]}
    print(json.dumps(result, indent=2))
    if args.profile_steps and prof is False:
        print(table)
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
