"""Micro-benchmark of the Triton paged-attention kernels (GPU only).

    python3 benchmarks/kernels/bench_attention.py [--json out.json] [--sweep]

Llama-3.1-8B attention shapes (32 q heads, 8 KV heads, head 128, bf16, block size 16):
  * decode: batch 256, contexts about 768 tokens (uniform in [640, 896]); memory bound.
    Bytes = K and V of every context token read once + q read + out written.
  * prefill: 16 prompts of 512 tokens, no cached context; compute bound.
    FLOPs = 4 * head_size * num_heads * (visible query-key pairs), causal pairs only.
Each time is the median of ``triton.testing.do_bench``; decode is also timed as a CUDA graph
replay (what the engine runs). The ceilings are measured in the same run: a 2 GiB
device-to-device copy (bytes read + written) and an 8192^3 bf16 matmul. torch SDPA on dense,
unpaged tensors is shown for orientation.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout

import triton  # noqa: E402

from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel, decode_attention, prefill_attention)
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.core.attention_batch import AttentionBatch  # noqa: E402

H, KVH, D, BS, DTYPE = 32, 8, 128, 16, torch.bfloat16
MAX_MODEL_LEN = 8192


def bench(fn, graph: bool = False) -> float:
    """Median milliseconds."""
    if graph:
        return triton.testing.do_bench_cudagraph(fn, rep=200, return_mode="median")
    return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median")


def measure_ceilings() -> tuple[float, float]:
    """(copy GB/s counting read + write, bf16 matmul TFLOP/s) measured on this device."""
    src = torch.randn(2**30, dtype=DTYPE, device="cuda")  # 2 GiB
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_gbs = 2 * src.numel() * 2 / ms / 1e6
    a = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    b = torch.randn(8192, 8192, dtype=DTYPE, device="cuda")
    ms = bench(lambda: a @ b)
    mm_tflops = 2 * 8192**3 / ms / 1e9
    return copy_gbs, mm_tflops


def make_batch(query_lens, seq_lens, gen):
    """Random paged caches with shuffled block tables and one step's q/k/v."""
    nblocks = [math.ceil(s / BS) for s in seq_lens]
    pool = torch.randperm(sum(nblocks), generator=gen)
    tables = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = pool[used:used + n]
        used += n
    k_cache = torch.randn(len(pool), BS, KVH, D, dtype=DTYPE, device="cuda")
    v_cache = torch.randn_like(k_cache)
    slots = [int(tables[s, p // BS]) * BS + p % BS for s in range(len(seq_lens))
             for p in range(seq_lens[s] - query_lens[s], seq_lens[s])]
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    t = len(slots)
    q = torch.randn(t, H, D, dtype=DTYPE, device="cuda")
    k = torch.randn(t, KVH, D, dtype=DTYPE, device="cuda")
    v = torch.randn_like(k)
    num_decodes = len(seq_lens) if max(query_lens) == 1 else 0
    batch = AttentionBatch(
        num_tokens=t, num_seqs=len(seq_lens), num_decodes=num_decodes,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device="cuda"),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device="cuda"),
        block_tables=tables.cuda(), slot_mapping=torch.tensor(slots, device="cuda"),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=list(seq_lens))
    return q, k, v, k_cache, v_cache, batch


def decode_case(batch_size: int, lo: int, hi: int, gen) -> dict:
    seq_lens = torch.randint(lo, hi + 1, (batch_size,), generator=gen).tolist()
    q, k, v, kc, vc, batch = make_batch([1] * batch_size, seq_lens, gen)
    kernel = TritonAttentionKernel(AttentionSpec(H, KVH, D, DTYPE, BS), MAX_MODEL_LEN,
                                   max_num_seqs=256)
    md = kernel.build_metadata(batch)
    fwd = lambda: kernel.forward(q, k, v, kc, vc, md, D**-0.5)  # noqa: E731
    fwd()
    ms_eager, ms_graph = bench(fwd), bench(fwd, graph=True)
    tokens = sum(seq_lens)
    nbytes = tokens * KVH * D * 2 * 2 + 2 * q.numel() * 2
    flops = 4 * tokens * H * D
    # torch SDPA on dense K/V padded to the longest context, for orientation.
    L = max(seq_lens)
    qd = q.view(batch_size, 1, H, D).transpose(1, 2)
    kd = torch.randn(batch_size, KVH, L, D, dtype=DTYPE, device="cuda")
    vd = torch.randn_like(kd)
    sdpa = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
        qd, kd, vd, enable_gqa=True)
    ms_sdpa = bench(sdpa)
    sdpa_bytes = kd.numel() * 2 * 2
    return dict(case=f"decode B={batch_size} ctx~{(lo + hi) // 2}", splits=md.num_splits,
                ms_eager=ms_eager, ms_graph=ms_graph, gbs=nbytes / ms_graph / 1e6,
                tflops=flops / ms_graph / 1e9, ms_sdpa_dense=ms_sdpa,
                gbs_sdpa_dense=sdpa_bytes / ms_sdpa / 1e6)


def prefill_case(num_prompts: int, prompt_len: int, gen) -> dict:
    q, k, v, kc, vc, batch = make_batch([prompt_len] * num_prompts,
                                        [prompt_len] * num_prompts, gen)
    kernel = TritonAttentionKernel(AttentionSpec(H, KVH, D, DTYPE, BS), MAX_MODEL_LEN)
    md = kernel.build_metadata(batch)
    ms = bench(lambda: kernel.forward(q, k, v, kc, vc, md, D**-0.5))
    pairs = num_prompts * prompt_len * (prompt_len + 1) // 2
    flops = 4 * pairs * H * D
    nbytes = (2 * q.numel() + 2 * 2 * k.numel()) * 2  # q, out, k/v read + cache written
    qd = q.view(num_prompts, prompt_len, H, D).transpose(1, 2)
    kd = k.view(num_prompts, prompt_len, KVH, D).transpose(1, 2)
    vd = v.view(num_prompts, prompt_len, KVH, D).transpose(1, 2)
    ms_sdpa = bench(lambda: torch.nn.functional.scaled_dot_product_attention(
        qd, kd, vd, is_causal=True, enable_gqa=True))
    return dict(case=f"prefill {num_prompts}x{prompt_len}", ms_eager=ms,
                tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6, ms_sdpa_dense=ms_sdpa,
                tflops_sdpa_dense=flops / ms_sdpa / 1e9)


PREFILL_TILES = [(128, 64, 8, 2), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 8, 3),
                 (64, 64, 4, 3), (64, 128, 4, 2), (128, 64, 4, 3), (256, 64, 8, 2)]
DECODE_TILES = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3), (32, 4, 4), (64, 8, 3),
                (64, 2, 4), (32, 2, 6)]


def sweep(gen) -> list[dict]:
    """Kernel-only times of other tile configs (the first is the default), each output checked
    against the default config's."""
    rows = []
    q, k, v, kc, vc, b = make_batch([512] * 16, [512] * 16, gen)
    kernel = TritonAttentionKernel(AttentionSpec(H, KVH, D, DTYPE, BS), MAX_MODEL_LEN)
    kernel.forward(q, k, v, kc, vc, kernel.build_metadata(b), D**-0.5)  # fills the cache
    flops = 4 * 16 * 512 * 513 // 2 * H * D
    base = None
    for tiles in PREFILL_TILES:
        out = torch.full_like(q, float("nan"))
        run = lambda: prefill_attention(  # noqa: E731
            q, kc, vc, out, b.query_start_loc, b.seq_lens, b.block_tables, D**-0.5,
            seq_offset=0, num_seqs=16, max_query_len=512, tiles=tiles)
        rows.append(_timed(f"prefill 16x512 tiles={tiles}", run, out, base, flops=flops))
        base = out if base is None else base
    seq_lens = torch.randint(640, 897, (256,), generator=gen).tolist()
    q, k, v, kc, vc, b = make_batch([1] * 256, seq_lens, gen)
    ws = torch.empty(256 * H * 4 * (D + 2), device="cuda")
    nbytes = sum(seq_lens) * KVH * D * 4
    for splits in (1, 2):
        base = None
        for tiles in DECODE_TILES:
            out = torch.full_like(q, float("nan"))
            run = lambda: decode_attention(  # noqa: E731
                q, kc, vc, out, b.query_start_loc, b.seq_lens, b.block_tables, D**-0.5,
                num_seqs=256, num_splits=splits, workspace=ws, tiles=tiles)
            rows.append(_timed(f"decode B=256 splits={splits} tiles={tiles}", run, out, base,
                               nbytes=nbytes, graph=True))
            base = out if base is None else base
    return rows


def _timed(case, run, out, base, flops=0, nbytes=0, graph=False) -> dict:
    try:
        run()
        torch.cuda.synchronize()
        ms = bench(run, graph=graph)
    except Exception as e:  # noqa: BLE001 - a config that does not fit is reported, not fatal
        return dict(case=case, error=f"{type(e).__name__}: {str(e)[:120]}")
    ok = not torch.isnan(out).any().item()
    if base is not None:
        ok = ok and (out.float() - base.float()).abs().max().item() < 2e-2
    return dict(case=case, ms=ms, ok=ok, tflops=flops / ms / 1e9, gbs=nbytes / ms / 1e6)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the results here as well")
    parser.add_argument("--sweep", action="store_true", help="also time other tile configs")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_attention.py needs a CUDA GPU.")
    gen = torch.Generator().manual_seed(0)
    device = torch.cuda.get_device_name()
    copy_gbs, mm_tflops = measure_ceilings()
    rows = [decode_case(256, 640, 896, gen), decode_case(32, 3584, 4608, gen),
            decode_case(1, 4096, 4096, gen), prefill_case(16, 512, gen),
            prefill_case(1, 512, gen)]
    print(f"device: {device}; measured ceilings: copy {copy_gbs:,.0f} GB/s, "
          f"bf16 matmul {mm_tflops:,.0f} TFLOP/s (anchors H200: 4,250 GB/s, ~800 TFLOP/s)")
    for r in rows:
        if r["case"].startswith("decode"):
            print(f"{r['case']:<24} splits={r['splits']:<3} eager {r['ms_eager'] * 1e3:8.1f} us"
                  f"  graph {r['ms_graph'] * 1e3:8.1f} us  {r['gbs']:7,.0f} GB/s "
                  f"({100 * r['gbs'] / copy_gbs:4.1f}% of copy)  {r['tflops']:6.1f} TFLOP/s | "
                  f"dense SDPA {r['ms_sdpa_dense'] * 1e3:8.1f} us {r['gbs_sdpa_dense']:7,.0f} GB/s")
        else:
            print(f"{r['case']:<24}            eager {r['ms_eager'] * 1e3:8.1f} us"
                  f"  {r['tflops']:6.1f} TFLOP/s ({100 * r['tflops'] / mm_tflops:4.1f}% of "
                  f"matmul)  {r['gbs']:6,.0f} GB/s | dense SDPA {r['ms_sdpa_dense'] * 1e3:8.1f}"
                  f" us {r['tflops_sdpa_dense']:6.1f} TFLOP/s")
    swept = sweep(gen) if args.sweep else []
    for r in swept:
        if "error" in r:
            print(f"{r['case']:<48} {r['error']}")
        else:
            print(f"{r['case']:<48} {r['ms'] * 1e3:8.1f} us  {r['tflops']:6.1f} TFLOP/s "
                  f"{r['gbs']:7,.0f} GB/s  {'ok' if r['ok'] else 'MISMATCH'}")
    if args.json:
        args.json.write_text(json.dumps(dict(device=device, copy_gbs=copy_gbs,
                                             mm_tflops=mm_tflops, rows=rows, sweep=swept),
                                        indent=1))


if __name__ == "__main__":
    main()
