"""B1 and F on Qwen3-30B-A3B shapes in one engine (random bf16 weights, one GPU), with the
kernel breakdown of a batch-1 decode step.

    PYTHONPATH=. python3 benchmarks/moe_engine.py --out $OUT [--skip-f]

One ``LLM`` (``load_format="dummy"``, ``max_model_len`` 4096, no prefix caching) serves, in order:
  1. B1: ``bench latency``'s measurement (512-token prompt, 256 output tokens, one warm-up run,
     then ``--b1-iters`` runs): ``b1_moe.json``.
  2. The captured batch-1 decode graph: GPU ms per replay (CUDA events), and the torch profiler
     over 10 replays: GPU time per step of each kernel name, largest first (``b1_profile.json``).
     TPOT - graph GPU time = what the host and the gaps between steps add.
  3. F: ``bench throughput``'s workload (256 prompts x 512 in / 256 out, random tokens, EOS
     ignored, greedy), the whole workload once untimed first, then timed: ``f_moe.json``.
Each JSON is written as soon as its part is done, so a time box that cuts the run keeps the
parts before it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections import defaultdict
from pathlib import Path

import torch

from tessellm import LLM, SamplingParams
from tessellm.entrypoints.bench_latency import measure
from tessellm.entrypoints.bench_throughput import make_requests


def b1(llm, out: Path, iters: int) -> None:
    ttfts, tpots = measure(llm, 512, 256, iters)
    res = {"input_len": 512, "output_len": 256, "ttft_ms": [round(t * 1e3, 2) for t in ttfts],
           "tpot_ms": [round(t * 1e3, 3) for t in tpots],
           "tpot_ms_median": round(statistics.median(tpots) * 1e3, 3),
           "async_scheduling": llm.engine.core.async_scheduling}
    print("B1", json.dumps(res), flush=True)
    (out / "b1_moe.json").write_text(json.dumps(res, indent=1))


def profile_graph(llm, out: Path) -> None:
    from torch.profiler import ProfilerActivity, profile

    gr = llm.engine.core.runner.graph_runner
    graph = gr._graphs[gr.padded_size(1)][0]
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(20):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    res = {"graph_gpu_ms_per_step": round(start.elapsed_time(end) / 20, 3)}
    reps = 10
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    per_name: dict = defaultdict(lambda: [0.0, 0])
    for evt in prof.events():
        us = evt.time_range.elapsed_us()  # a device event's range is the kernel's
        if evt.device_type.name == "CUDA" and us > 0:
            per_name[evt.name][0] += us / reps
            per_name[evt.name][1] += 1
    rows = sorted(((n, round(us, 1), c // reps) for n, (us, c) in per_name.items()),
                  key=lambda r: -r[1])
    res["kernels_us_per_step"] = [dict(name=n[:120], us=us, launches=c) for n, us, c in rows]
    res["kernel_sum_us_per_step"] = round(sum(r[1] for r in rows), 1)
    res["launches_per_step"] = sum(r[2] for r in rows)
    print("graph", res["graph_gpu_ms_per_step"], "ms; kernels", res["kernel_sum_us_per_step"],
          "us in", res["launches_per_step"], "launches", flush=True)
    for r in res["kernels_us_per_step"][:25]:
        print(f"  {r['us']:8.1f} us  x{r['launches']:4d}  {r['name']}", flush=True)
    (out / "b1_profile.json").write_text(json.dumps(res, indent=1))


def throughput(llm, out: Path, num: int, input_len: int, output_len: int) -> None:
    vocab = llm.engine.core.vocab_size

    def run(seed: int) -> float:
        reqs = make_requests(num, input_len, output_len, 0.0, vocab, seed)
        params = SamplingParams(max_tokens=output_len, temperature=0, ignore_eos=True)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params,
                            use_tqdm=False)
        torch.cuda.synchronize()
        assert all(len(o.outputs[0].token_ids) == output_len for o in outs)
        return time.perf_counter() - t0

    warm = run(1)
    elapsed = run(0)
    res = {"num_prompts": num, "input_len": input_len, "output_len": output_len,
           "warmup_s": round(warm, 3), "elapsed_s": round(elapsed, 3),
           "output_tokens_per_s": round(num * output_len / elapsed, 1),
           "total_tokens_per_s": round(num * (input_len + output_len) / elapsed, 1)}
    print("F", json.dumps(res), flush=True)
    (out / "f_moe.json").write_text(json.dumps(res, indent=1))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default="benchmarks/model-configs/qwen3-30b-a3b")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--b1-iters", type=int, default=2)
    p.add_argument("--skip-f", action="store_true")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    llm = LLM(args.model, load_format="dummy", max_model_len=4096, enable_prefix_caching=False)
    print(f"engine ready in {time.perf_counter() - t0:.1f} s", flush=True)
    b1(llm, args.out, args.b1_iters)
    try:
        profile_graph(llm, args.out)
    except Exception as e:  # noqa: BLE001 - the figures after it matter more
        print("profile failed:", type(e).__name__, str(e)[:300], flush=True)
    if not args.skip_f:
        throughput(llm, args.out, 256, 512, 256)
    print(f"done in {time.perf_counter() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
