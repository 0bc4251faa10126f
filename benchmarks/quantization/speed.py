"""GPU speed of quantized linears and of the engine with them: bf16 vs int8 vs fp8 (vs int4).

Part 1, GEMMs (``--gemm``): the four projections of one Llama-3.1-8B layer (qkv 6144x4096,
o 4096x4096, gate_up 28672x4096, down 4096x14336) at several token counts M, each scheme's
``QuantOps`` against ``F.linear`` in bf16. Median of CUDA-event timings; no graphs.

Part 2, engine (``--engine``): for each config, one ``LLM`` with Llama-3.1-8B shapes and random
weights (``load_format="dummy"``), then
  B1: one request, 512 prompt tokens, 256 output tokens: TTFT and ms per output token;
  F:  256 requests of 512 random prompt tokens and exactly 256 output tokens, greedy: output
      tokens per second (model loading and graph capture excluded), run twice: "F cold" is the
      first run, which also pays Triton's compilation of every kernel variant its eager mixed
      steps meet (seconds per variant on a fresh machine); "F" is the second;
  decode: one batch-256 decode step at context ~520 (``--decode-profile``): wall and CUDA
      graph replay ms per step, and the kernels of one eager step grouped (attention, GEMMs,
      the rest);
plus the weight bytes on the GPU and the KV cache tokens the engine could allocate.

Every result is appended to ``--out`` (JSON) as soon as it is measured, so a run cut short by
a time limit keeps what it finished. ``--deadline`` (seconds) skips what would not fit.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LLAMA_8B = os.path.join(ROOT, "benchmarks", "model-configs", "llama-3.1-8b")
LAYER = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
START = time.perf_counter()


def _record(path, key, value):
    data = {}
    if path and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)
    print(key, json.dumps(value), flush=True)


def _time_cuda(fn, iters=20, warmup=3) -> float:
    import torch

    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)  # us
    return statistics.median(times)


def gemm_bench(args) -> None:
    import torch
    import torch.nn.functional as F

    from tessellm.kernels.gemm.quant_ops import TritonQuantOps
    from tessellm.quantization.packed import (Int4Weight, pack_int4, quantize_fp8, quantize_int4,
                                              quantize_int8)

    ops, fallback = TritonQuantOps(), TritonQuantOps(use_scaled_mm=False)
    fused = TritonQuantOps(dequant_min_m=1 << 30)  # always the dequantize-in-GEMM kernel
    dev = torch.device("cuda")
    results = {}
    for name, (n, k) in LAYER.items():
        w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
        segs = {"int8": quantize_int8(w), "fp8": quantize_fp8(w)}
        q, s, z = quantize_int4(w, 128)
        segs["int4"] = Int4Weight(pack_int4(q), s.half(), (-z * s).float(), 0, 128)
        for m in args.m:
            x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
            row = {"bf16": _time_cuda(lambda: F.linear(x, w))}
            row["int8"] = _time_cuda(lambda: ops.int8_mm(x, segs["int8"]))
            row["int8_fused"] = _time_cuda(lambda: fused.int8_mm(x, segs["int8"]))
            row["int4_g128"] = _time_cuda(lambda: ops.int4_mm(x, segs["int4"]))
            row["int4_g128_fused"] = _time_cuda(lambda: fused.int4_mm(x, segs["int4"]))
            row["fp8_scaled_mm"] = _time_cuda(lambda: ops.fp8_mm(x, segs["fp8"]))
            row["fp8_triton"] = _time_cuda(lambda: fallback.fp8_mm(x, segs["fp8"]))
            results[f"{name} M={m}"] = {kk: round(v, 1) for kk, v in row.items()}
            print(name, m, results[f"{name} M={m}"], flush=True)
    per_layer = {}
    for m in args.m:
        keys = results[f"qkv M={m}"].keys()
        per_layer[m] = {kk: round(sum(results[f"{nm} M={m}"][kk] for nm in LAYER), 1) for kk in keys}
    _record(args.out, "gemm_us", {"per_gemm": results, "per_layer_sum": per_layer,
                                  "device": torch.cuda.get_device_name()})


def _engine(config: dict, args):
    from tessellm import LLM

    kwargs = dict(load_format="dummy", max_model_len=4096, enable_prefix_caching=False, seed=0,
                  device=args.device)
    kwargs.update(config)
    return LLM(args.model, **kwargs)


def b1(llm, args) -> dict:
    from tessellm.entrypoints.bench_latency import measure

    ttfts, tpots = measure(llm, args.input_len, args.output_len, args.b1_iters)
    return {"ttft_ms": round(statistics.median(ttfts) * 1e3, 2),
            "tpot_ms": round(statistics.median(tpots) * 1e3, 3)}


def f(llm, args) -> dict:
    from tessellm import SamplingParams
    from tessellm.entrypoints.bench_throughput import make_requests

    core = llm.engine.core
    reqs = make_requests(args.f_prompts, args.input_len, args.output_len, 0.0, core.vocab_size, 7)
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    core.backend.synchronize()
    start = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in reqs], params,
                        use_tqdm=False)
    core.backend.synchronize()
    secs = time.perf_counter() - start
    tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"requests": len(reqs), "output_tokens": tokens, "seconds": round(secs, 2),
            "output_tok_per_s": round(tokens / secs, 1)}


def decode_profile(llm, batch: int = 256, input_len: int = 512, steps: int = 20) -> dict:
    """Time batch-``batch`` decode steps (as benchmarks/profile_step.py does, for any config)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from tessellm import SamplingParams

    eng, core = llm.engine, llm.engine.core
    params = SamplingParams(max_tokens=steps + 20, ignore_eos=True, temperature=0)
    for i in range(batch):
        ids = [(7 * i + j) % 1000 + 10 for j in range(input_len)]
        eng.add_request(f"prof-{i}", {"prompt_token_ids": ids}, params)
    while any(r.num_output_tokens == 0 for r in core.scheduler.running) or core.scheduler.waiting:
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        eng.step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    result = {"batch": batch, "wall_ms": round(wall_ms, 3)}
    runner = core.runner
    gr = runner.graph_runner
    if gr is not None and gr.padded_size(batch) is not None:
        graph = gr._graphs[gr.padded_size(batch)][0]
        graph.replay()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        for _ in range(10):
            graph.replay()
        b.record()
        torch.cuda.synchronize()
        result["graph_gpu_ms"] = round(a.elapsed_time(b) / 10, 3)
    ready, runner._graphs_ready = runner._graphs_ready, False  # one eager step, for its kernels
    sched = core.scheduler.schedule()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        res = runner.execute(sched)
        torch.cuda.synchronize()
    core.scheduler.update(sched, res.sampled)
    runner._graphs_ready = ready
    groups = {"attention": 0.0, "gemm": 0.0, "other": 0.0}
    top = []
    for evt in prof.key_averages():
        us = getattr(evt, "device_time_total", None) or getattr(evt, "cuda_time_total", 0)
        name = evt.key.lower()
        if "decode" in name or "prefill" in name or "attention" in name or "cache" in name:
            groups["attention"] += us
        elif any(t in name for t in ("gemm", "cutlass", "sm90", "nvjet", "matmul", "scaled_mm")):
            groups["gemm"] += us
        else:
            groups["other"] += us
        top.append((round(us / 1e3, 3), evt.key[:60]))
    result["eager_kernels_ms"] = {k: round(v / 1e3, 3) for k, v in groups.items()}
    result["eager_top"] = sorted(top, reverse=True)[:8]
    for i in range(batch):
        eng.abort_request(f"prof-{i}")
    while eng.has_unfinished_requests():
        eng.step()
    return result


def engine_bench(args) -> None:
    import torch

    from tessellm.quantization.loading import weight_bytes

    from tessellm.kernels.gemm import quant_ops as qo
    from tessellm.kernels.gemm import weight_only as qk

    configs = {"bf16": {}, "int8": {"quantization": "int8"}, "fp8": {"quantization": "fp8"},
               "fp8+kv_fp8": {"quantization": "fp8", "kv_cache_dtype": "fp8"},
               "fp8-skinny-w8a8": {"quantization": "fp8"},  # decode through gemv.gemv_w8a8
               "fp8-gemv-x2": {"quantization": "fp8"},  # one row through gemv.gemv_fp8_x2
               "fp8-no-x2": {"quantization": "fp8"}}
    skinny, x2 = qo.FP8_SKINNY_W8A8_MAX_M, qk.FP8_GEMV_X2
    for name in args.configs:  # read when the ops are built / called
        qo.FP8_SKINNY_W8A8_MAX_M = 16 if name == "fp8-skinny-w8a8" else skinny
        qk.FP8_GEMV_X2 = {"fp8-gemv-x2": True, "fp8-no-x2": False}.get(name, x2)
        if time.perf_counter() - START > args.deadline:
            _record(args.out, f"{name}", "skipped: deadline")
            continue
        t0 = time.perf_counter()
        llm = _engine(configs[name], args)
        core = llm.engine.core
        info = {"load_and_capture_s": round(time.perf_counter() - t0, 1),
                "weight_gb": round(weight_bytes(core.runner.model) / 1e9, 3),
                "kv_tokens": core.info.num_kv_blocks * core.info.block_size,
                "graphs": core.runner.graph_runner is not None}
        _record(args.out, f"{name} memory", info)
        for workload in args.workloads:
            if time.perf_counter() - START > args.deadline:
                _record(args.out, f"{name} {workload}", "skipped: deadline")
                continue
            if workload == "B1":
                _record(args.out, f"{name} B1", b1(llm, args))
            elif workload == "F":
                _record(args.out, f"{name} F cold", f(llm, args))
                _record(args.out, f"{name} F", f(llm, args))
            elif workload == "decode":
                _record(args.out, f"{name} decode", decode_profile(llm))
        del llm, core
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gemm", action="store_true")
    p.add_argument("--engine", action="store_true")
    p.add_argument("--m", type=int, nargs="+", default=[1, 16, 64, 256, 1024, 4096])
    p.add_argument("--configs", nargs="+", default=["bf16", "fp8", "int8", "fp8+kv_fp8"])
    p.add_argument("--workloads", nargs="+", default=["B1", "F"], help="B1, F, decode")
    p.add_argument("--b1-iters", type=int, default=2)
    p.add_argument("--f-prompts", type=int, default=256)
    p.add_argument("--input-len", type=int, default=512)
    p.add_argument("--output-len", type=int, default=256)
    p.add_argument("--deadline", type=float, default=1e9)
    p.add_argument("--model", default=LLAMA_8B, help="a config directory (random weights)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.gemm:
        gemm_bench(args)
    if args.engine:
        engine_bench(args)


if __name__ == "__main__":
    main()
