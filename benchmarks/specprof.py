"""Does the memory profile cover speculative decoding (and the decode overlap's side stream)?

One engine in this process (one GPU, random weights: ``--load-format dummy``), then one batch of
``max_num_seqs`` prompts served (greedy, EOS ignored). With ``--spec`` (a speculative_config as
JSON; ``disable_by_batch_size`` 0 so that every step of the full batch drafts and verifies) the
profile step ran the drafter's forward (and the rejection sampler where drafts carry their
distribution); with ``--decode-overlap`` the profile step was split, leaving blocks on the side
stream that graph capture empties and the graph runner caches again. Prints, each line starting
with ``[label]``:

* ``memory profile``: the profile step's peak above the weights (the drafter's alone), the
  graphs' reserve against their pools (decode, verify, draft graphs), the KV blocks;
* ``side stream`` (``--decode-overlap``): its wholly free cached segments at ready (the fix:
  the profile's, cached again after capture; before it: 0);
* ``RUN``: the batch's step peak measured (the allocator's peak above what was allocated before
  the run) against the profile's peak (``covered`` when not above it), allocator segments and
  reserved bytes before -> after, device mallocs, alloc retries, out-of-memory errors;
* ``device memory``: used after the run against gpu_memory_utilization x total.

    python3 benchmarks/specprof.py --label draft90 \\
        --spec '{"method": "draft_model", "model": "benchmarks/model-configs/llama-3.2-1b", ...}'
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

GIB = 2**30


def _stats() -> dict:
    s = torch.cuda.memory_stats()
    return {"allocated": s.get("allocated_bytes.all.current", 0), "peak": s.get("allocated_bytes.all.peak", 0),
            "reserved": s.get("reserved_bytes.all.current", 0), "segments": s.get("segment.all.current", 0),
            "mallocs": s.get("num_device_alloc", 0), "retries": s.get("num_alloc_retries", 0),
            "ooms": s.get("num_ooms", 0)}


def _stream_segments(stream) -> tuple[int, int, int]:
    """(segments, of them wholly free, their bytes) the allocator holds on ``stream``."""
    segs = [s for s in torch.cuda.memory_snapshot() if s["stream"] == stream.cuda_stream]
    free = [s for s in segs if s["allocated_size"] == 0]
    return len(segs), len(free), sum(s["total_size"] for s in free)


def _pools(runner) -> dict:
    verify = getattr(runner, "verify_graphs", None)
    drafter = getattr(getattr(runner.spec, "proposer", None), "graph_runner", None)
    logits = getattr(runner, "graph_logits", None)  # the graphs' one logits buffer (beside the pools)
    return {"decode": getattr(runner.graph_runner, "pool_bytes", 0) or 0,
            "logits": 0 if logits is None else logits.nbytes,
            "verify": sum(getattr(r, "pool_bytes", 0) or 0 for r in (verify.runners.values() if verify else ())),
            "draft": getattr(drafter, "pool_bytes", 0) or 0}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="benchmarks/model-configs/llama-3.1-8b")
    ap.add_argument("--spec", default=None, help="speculative_config (JSON)")
    ap.add_argument("--decode-overlap", action="store_true")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.90)
    ap.add_argument("--max-num-seqs", type=int, default=256)
    ap.add_argument("--max-num-batched-tokens", type=int, default=None)
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--input-len", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=32)
    ap.add_argument("--label", default="specprof")
    ap.add_argument("--output-json", default=None)
    args = ap.parse_args()
    from tessellm import LLM, SamplingParams

    lbl = args.label
    extra = {}
    if args.decode_overlap:
        extra.update(enable_decode_overlap=True, decode_overlap_steps="mixed")
    if args.max_num_batched_tokens:
        extra["max_num_batched_tokens"] = args.max_num_batched_tokens
    t0 = time.perf_counter()
    llm = LLM(model=args.model, load_format="dummy", max_model_len=args.max_model_len,
              gpu_memory_utilization=args.gpu_memory_utilization, max_num_seqs=args.max_num_seqs,
              speculative_config=json.loads(args.spec) if args.spec else None, **extra)
    worker = llm.engine.core.executor.worker
    runner, mp = worker.runner, worker.memory_profile
    pools = _pools(runner)
    print(f"[{lbl}] start {time.perf_counter() - t0:.1f} s | memory profile: step peak "
          f"{mp['profile_peak'] / GIB:.2f} GiB above the weights (drafter alone "
          f"{mp.get('draft_peak', 0) / GIB:.2f}), graphs reserved {mp['graph_estimate'] / GIB:.2f} GiB"
          f" / pools decode {pools['decode'] / GIB:.2f} + logits {pools['logits'] / GIB:.2f} + verify "
          f"{pools['verify'] / GIB:.2f} + draft "
          f"{pools['draft'] / GIB:.2f} = {sum(pools.values()) / GIB:.2f} GiB, free at sizing "
          f"{mp['free'] / GIB:.2f} of {mp['total'] / GIB:.2f} GiB, {llm.engine.info.num_kv_blocks} KV blocks",
          flush=True)
    side = runner.overlap.streams.stream if args.decode_overlap and runner.overlap is not None else None
    if args.decode_overlap:
        if side is None or not hasattr(side, "cuda_stream"):
            print(f"[{lbl}] side stream: none (the decode overlap is off on this engine)")
            side = None
        else:
            n, free, size = _stream_segments(side)
            print(f"[{lbl}] side stream at ready: {n} segments, {free} wholly free cached "
                  f"({size / GIB:.2f} GiB)", flush=True)
    vocab = llm.engine.info.vocab_size
    rng = random.Random(0)
    prompts = [[rng.randrange(min(1000, vocab // 2), vocab) for _ in range(args.input_len)] for _ in range(args.max_num_seqs)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = _stats()
    t1 = time.perf_counter()
    error = None
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        assert all(len(o.outputs[0].token_ids) == args.output_len for o in outs)
    except torch.OutOfMemoryError as e:  # the thing this checks: reported, not hidden
        error = f"OutOfMemoryError: {e}"
    torch.cuda.synchronize()
    after = _stats()
    step = after["peak"] - before["allocated"]
    verdict = "covered" if step <= mp["profile_peak"] else f"OVER by {(step - mp['profile_peak']) / GIB:.2f} GiB"
    print(f"[{lbl}] RUN {args.max_num_seqs} x {args.input_len} in / {args.output_len} out: "
          f"{time.perf_counter() - t1:.1f} s | step peak measured {step / GIB:.2f} GiB vs predicted "
          f"{mp['profile_peak'] / GIB:.2f} GiB: {verdict} | segments {before['segments']} -> "
          f"{after['segments']} (+{after['segments'] - before['segments']}), reserved "
          f"{before['reserved'] / GIB:.2f} -> {after['reserved'] / GIB:.2f} GiB, device mallocs "
          f"+{after['mallocs'] - before['mallocs']}, alloc retries +{after['retries'] - before['retries']}, "
          f"OOMs +{after['ooms'] - before['ooms']}" + (f" | {error}" if error else ""), flush=True)
    if side is not None:
        n, free, size = _stream_segments(side)
        print(f"[{lbl}] side stream after the run: {n} segments, {free} wholly free ({size / GIB:.2f} GiB)")
    free_now, total = torch.cuda.mem_get_info()
    used = total - free_now
    print(f"[{lbl}] device memory after the run: {used / GIB:.2f} of {total / GIB:.2f} GiB "
          f"(limit {args.gpu_memory_utilization:.2f} x total = {args.gpu_memory_utilization * total / GIB:.2f}): "
          + ("under" if used <= args.gpu_memory_utilization * total else "ABOVE"))
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump({"label": lbl, "memory_profile": mp, "pools": pools, "before": before,
                       "after": after, "step_peak": step, "error": error}, f, indent=2, default=str)
    llm.shutdown()


if __name__ == "__main__":
    main()
