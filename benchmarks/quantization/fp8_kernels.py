"""GPU timings behind the fp8 choices: the small-M fp8 GEMM path and the fp8 KV attention tiles.

Part 1, GEMMs (``--gemm``): one Llama-3.1-8B layer's four projections (qkv, o, gate_up, down) at
token counts M, per method: bf16 ``F.linear``; int8 W8A16; fp8 W8A8 (per-token quantization +
``torch._scaled_mm``); fp8 W8A16 (``fp8_weight_only_gemm``) with its default tiles and with
each tile config of ``--configs``. Each figure is the layer's four GEMMs captured 10 times in
one CUDA graph, replayed; microseconds per layer (median of replays / 10), so launch gaps are
those the engine's decode graphs see. The weights (218 MB in fp8) are several times the L2.

Part 2, attention (``--attention``): the split-KV decode kernel at batch 1, 64 and 256 (context
uniform in [512, 768]) and the prefill kernel (16 x 512 tokens), Llama-8B heads (32 q, 8 kv,
dim 128), bf16 cache vs fp8 cache with each tile conversion (``triton_attention._fp8_ptx``):
microseconds per layer call and the KV bytes it reads per microsecond.

Results go to ``--out`` (JSON), each part as soon as it is measured; a short table is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.nn.functional as F

from tessellm.testing.timing import graph_time_us

LAYER = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, most split-K) for the W8A16 sweep
CONFIGS = {
    "16x64x128": (16, 64, 128, 4, 4, 16), "16x32x256": (16, 32, 256, 4, 4, 16),
    "16x64x256": (16, 64, 256, 4, 3, 16), "16x128x128": (16, 128, 128, 4, 4, 16),
    "16x32x256-nosplit": (16, 32, 256, 4, 4, 1), "16x64x128-nosplit": (16, 64, 128, 4, 4, 1),
    "16x32x128-w2": (16, 32, 128, 2, 6, 16),
    "32x64x128": (32, 64, 128, 4, 4, 16), "64x64x128": (64, 64, 128, 4, 3, 16),
    "64x128x64": (64, 128, 64, 4, 4, 16),
}


def _record(path, key, value):
    data = {}
    if path and os.path.exists(path):
        with open(path) as f:
            data = json.load(f)
    data[key] = value
    if path:
        with open(path, "w") as f:
            json.dump(data, f, indent=2)


def graph_us(fn, reps=10, replays=20) -> float:
    """Microseconds per ``fn()`` from a CUDA graph of ``reps`` calls, median of replays."""
    return graph_time_us([fn], reps, replays)[0]


def event_us(fn, iters=30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) * 1e3)
    return statistics.median(times)


def gemm_bench(args) -> dict:
    from tessellm.kernels.gemm import quant_ops, weight_only as qk
    from tessellm.quantization.packed import quantize_fp8, quantize_int8

    w8a8 = quant_ops.TritonQuantOps(fp8_weight_only_max_m=0)
    dev = torch.device("cuda")
    torch.manual_seed(0)
    ws = {name: torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02
          for name, (n, k) in LAYER.items()}
    fp8 = {name: quantize_fp8(w) for name, w in ws.items()}
    int8 = {name: quantize_int8(w) for name, w in ws.items()}
    results = {}
    for m in args.m:
        xs = {name: torch.randn(m, k, device=dev, dtype=torch.bfloat16)
              for name, (_, k) in LAYER.items()}

        def layer(op):
            return lambda: [op(name, xs[name]) for name in LAYER]

        row = {"bf16": graph_us(layer(lambda nm, x: F.linear(x, ws[nm]))),
               "int8": graph_us(layer(lambda nm, x: w8a8.int8_mm(x, int8[nm]))),
               "fp8_w8a8": graph_us(layer(lambda nm, x: w8a8.fp8_mm(x, fp8[nm]))),
               "fp8_w8a16": graph_us(layer(lambda nm, x: qk.fp8_weight_only_gemm(x, fp8[nm])))}
        if m <= args.sweep_max_m:
            for cname, cfg in CONFIGS.items():
                if cfg[0] > 16 and m < 16 or cfg[0] == 16 and m > 16:
                    continue
                try:
                    row[f"w8a16 {cname}"] = graph_us(layer(
                        lambda nm, x, cfg=cfg: qk.fp8_weight_only_gemm(x, fp8[nm], config=cfg)))
                except Exception as exc:  # a config that does not fit (shared memory)
                    row[f"w8a16 {cname}"] = f"failed: {type(exc).__name__}"
        results[m] = {k: (round(v, 1) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"M={m}", json.dumps(results[m]), flush=True)
        _record(args.out, "gemm_layer_us", results)
    return results


def _attention_inputs(batch, ctx_lo, ctx_hi, query_len, dtype, cache_dtype, seed=0):
    h, kvh, d, bs = 32, 8, 128, 16
    g = torch.Generator(device="cuda").manual_seed(seed)
    ctx = torch.randint(ctx_lo, ctx_hi + 1, (batch,), generator=g, device="cuda")
    seq_lens = (ctx + query_len).to(torch.int32)
    nblk = (seq_lens + bs - 1) // bs
    width = int(nblk.max())
    total = int(nblk.sum())
    perm = torch.randperm(total, generator=g, device="cuda").to(torch.int32)
    tables = torch.zeros(batch, width, dtype=torch.int32, device="cuda")
    start = 0
    for i, n in enumerate(nblk.tolist()):
        tables[i, :n] = perm[start:start + n]
        start += n
    kc = (torch.randn(total, bs, kvh, d, generator=g, device="cuda") * 2).to(cache_dtype)
    vc = torch.randn(total, bs, kvh, d, generator=g, device="cuda").to(cache_dtype)
    t = batch * query_len
    q = torch.randn(t, h, d, generator=g, device="cuda").to(dtype)
    qsl = torch.arange(0, t + 1, query_len, dtype=torch.int32, device="cuda")
    kv_bytes = int(seq_lens.sum()) * kvh * d * 2 * kc.element_size()
    return q, kc, vc, qsl, seq_lens, tables, kv_bytes


def attention_bench(args) -> dict:
    from tessellm.kernels import attention as ta
    from tessellm.backends.spec import AttentionSpec

    dtype = torch.bfloat16
    spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128, dtype=dtype, block_size=16)
    kernel = ta.TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=256)
    ways = [("bf16", torch.bfloat16, "auto"), ("fp8 triton", torch.float8_e4m3fn, "triton"),
            ("fp8 cvt", torch.float8_e4m3fn, "cvt"), ("fp8 bits", torch.float8_e4m3fn, "bits")]
    results = {}
    for batch in args.decode_batches:
        row = {}
        for label, cache_dtype, convert in ways:
            q, kc, vc, qsl, seq_lens, tables, kv_bytes = _attention_inputs(
                batch, 512, 768, 1, dtype, cache_dtype)
            splits = kernel.num_splits(batch)
            ws = torch.empty(ta.decode_workspace_numel(batch, 32, splits, 128), device="cuda")
            out = torch.empty_like(q)
            us = event_us(lambda: ta.decode_attention(
                q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, num_seqs=batch,
                num_splits=splits, workspace=ws, fp8_convert=convert))
            row[label] = {"us": round(us, 1), "GB_per_s": round(kv_bytes / us / 1e3, 1)}
        results[f"decode batch {batch}"] = row
        print(f"decode batch={batch}", json.dumps(row), flush=True)
        _record(args.out, "attention", results)
    row = {}
    for label, cache_dtype, convert in ways:
        q, kc, vc, qsl, seq_lens, tables, kv_bytes = _attention_inputs(16, 0, 0, 512, dtype,
                                                                       cache_dtype)
        out = torch.empty_like(q)
        us = event_us(lambda: ta.prefill_attention(
            q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, seq_offset=0, num_seqs=16,
            max_query_len=512, fp8_convert=convert))
        row[label] = {"us": round(us, 1)}
    results["prefill 16x512"] = row
    print("prefill 16x512", json.dumps(row), flush=True)
    _record(args.out, "attention", results)
    return results


DECODE_TILES = [(32, 4, 3), (64, 4, 3), (64, 4, 4), (64, 8, 3), (64, 2, 3), (128, 4, 2),
                (128, 4, 3), (128, 8, 2), (128, 8, 3), (256, 8, 2)]


def attention_sweep(args) -> dict:
    """Decode tiles (BLOCK_N, num_warps, num_stages) x splits, per cache dtype/conversion."""
    from tessellm.kernels import attention as ta
    from tessellm.backends.spec import AttentionSpec

    dtype = torch.bfloat16
    spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128, dtype=dtype, block_size=16)
    kernel = ta.TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=256)
    ways = [("bf16", torch.bfloat16, "auto"), ("fp8 cvt", torch.float8_e4m3fn, "cvt")]
    results = {}
    for batch in args.decode_batches:
        for label, cache_dtype, convert in ways:
            q, kc, vc, qsl, seq_lens, tables, kv_bytes = _attention_inputs(
                batch, 512, 768, 1, dtype, cache_dtype)
            out = torch.empty_like(q)
            base = kernel.num_splits(batch)
            row = {}
            for splits in sorted({base, base * 2}):
                ws = torch.empty(ta.decode_workspace_numel(batch, 32, splits, 128), device="cuda")
                for tiles in DECODE_TILES:
                    if splits != base and tiles[0] not in (64, 128):
                        continue
                    try:
                        us = event_us(lambda: ta.decode_attention(
                            q, kc, vc, out, qsl, seq_lens, tables, 128 ** -0.5, num_seqs=batch,
                            num_splits=splits, workspace=ws, tiles=tiles, fp8_convert=convert))
                        row[f"{tiles} s{splits}"] = round(us, 1)
                    except Exception as exc:
                        row[f"{tiles} s{splits}"] = f"failed: {type(exc).__name__}"
            best = min((v, k) for k, v in row.items() if isinstance(v, float))
            results[f"decode batch {batch} {label}"] = {"best": best, "all": row}
            default = row.get(f"(64, 4, 3) s{base}")
            print(f"sweep batch={batch} {label} best={best} default={default}", flush=True)
            _record(args.out, "attention_sweep", results)
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--gemm", action="store_true")
    p.add_argument("--attention", action="store_true")
    p.add_argument("--attention-sweep", action="store_true")
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64, 128, 256])
    p.add_argument("--sweep-max-m", type=int, default=64)
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    _record(args.out, "device", torch.cuda.get_device_name())
    if args.attention:
        attention_bench(args)
    if args.attention_sweep:
        attention_sweep(args)
    if args.gemm:
        gemm_bench(args)
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
