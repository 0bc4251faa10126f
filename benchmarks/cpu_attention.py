"""The cpu backend's decode attention, C kernel against the torch path, side by side.

    python benchmarks/cpu_attention.py [--threads 1 2] [--seqs 64] [--output-json F]

One layer of SmolLM2-135M's attention (9 query heads, 3 KV heads, head size 64, blocks of 16)
for ``--seqs`` decodes with contexts drawn from 100-500 tokens, the blocks scattered over a
1 GiB cache (like the engine's), float32 and bfloat16: the median of 5 rounds of 20 calls
for the native kernel (``csrc/paged_decode.c``) and the torch path (gathered K/V + SDPA in
length-sorted groups), and the K/V read rate of the native kernel. Also the prefill SDPA of
one sequence with ``enable_gqa=True`` (3-D, torch's math path) against the 4-D form with K/V
expanded over the query group (flash path) that ``attention.py`` runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F

from tessellm.backends.cpu import native
from tessellm.backends.cpu.attention import CpuAttentionKernel
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step


def _median_ms(fn, rounds=5, calls=20) -> float:
    fn()
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t) / calls * 1e3)
    return sorted(times)[len(times) // 2]


def decode_case(seqs: int, dtype) -> dict:
    gen = torch.Generator().manual_seed(0)
    ctx = torch.randint(100, 500, (seqs,), generator=gen).tolist()
    step = make_paged_step([1] * seqs, ctx, num_kv_heads=3, group=3, head_size=64, block_size=16,
                           dtype=dtype, device="cpu", seed=1)
    nb = (1 << 30) // (16 * 3 * 64 * step.k_cache.element_size()) // 2
    kc, vc = torch.zeros(nb, 16, 3, 64, dtype=dtype), torch.zeros(nb, 16, 3, 64, dtype=dtype)
    perm = torch.randperm(nb, generator=gen)[:step.k_cache.shape[0]]
    kc[perm], vc[perm] = step.k_cache, step.v_cache
    step.batch.block_tables = perm[step.batch.block_tables.long()].to(torch.int32)
    out = {}
    for mode in ("torch", "native"):
        kernel = CpuAttentionKernel(AttentionSpec(9, 3, 64, dtype, 16, "auto", None))
        if mode == "torch":
            kernel.native = None
        elif kernel.native is None:
            out["native"] = f"unavailable: {native.unavailable_reason()}"
            continue
        md = kernel.build_metadata(step.batch)
        out[mode] = round(_median_ms(lambda: kernel.forward(step.q, step.k, step.v, kc, vc, md, step.scale)), 3)
    if isinstance(out.get("native"), float):
        kv_bytes = (sum(ctx) + seqs) * 3 * 64 * 2 * step.k_cache.element_size()
        out["native_gb_s"] = round(kv_bytes / out["native"] / 1e6, 1)
    return out


def prefill_case(tokens: int) -> dict:
    q, k, v = torch.randn(9, tokens, 64), torch.randn(3, tokens, 64), torch.randn(3, tokens, 64)
    gqa = lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)  # noqa: E731
    qg = q.unflatten(0, (3, 3))
    ke, ve = k[:, None].expand(3, 3, tokens, 64), v[:, None].expand(3, 3, tokens, 64)
    flat = lambda: F.scaled_dot_product_attention(qg, ke, ve, is_causal=True)  # noqa: E731
    calls = max(2, 4000 // tokens)
    return {"enable_gqa_3d": round(_median_ms(gqa, 3, calls), 3), "expanded_4d": round(_median_ms(flat, 3, calls), 3)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--seqs", type=int, default=64)
    ap.add_argument("--output-json")
    args = ap.parse_args()
    result = {"loadavg_start": os.getloadavg()[0], "runs": []}
    for threads in args.threads:
        torch.set_num_threads(threads)
        for dtype in (torch.float32, torch.bfloat16):
            row = {"threads": threads, "dtype": str(dtype), **decode_case(args.seqs, dtype)}
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
        for tokens in (146, 2048):
            row = {"threads": threads, "prefill_tokens": tokens, **prefill_case(tokens)}
            print(json.dumps(row), flush=True)
            result["runs"].append(row)
    result["loadavg_end"] = os.getloadavg()[0]
    print("load average", result["loadavg_start"], "->", result["loadavg_end"])
    if args.output_json:
        with open(args.output_json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
