"""Micro-benchmark of the Triton MLA kernels, before and after the split-KV decode and the
expanded prefill (GPU only).

    python3 benchmarks/kernels/bench_mla.py [--json out.json]

DeepSeek-V2-Lite attention shapes: 16 heads, kv_lora_rank 512, rope 64 (latent row 576),
nope 128, v 128, bf16, block size 16, blocks scattered over the cache.
  * decode: batch 64, every context 2,048 tokens. Memory bound: the bytes are the latent rows
    read once per sequence (64 x 2,048 x 576 x 2 B = 151 MB; fp8: half).
    old = the one-pass kernel (``mla_chunks``: one program per 16 heads a sequence, walking all
    its keys), new = ``mla_decode`` (split-KV, splits from the batch size), also with fp8 rows.
  * prefill: one prompt of 2,048 tokens, no cached context. Compute bound.
    old = absorbed: ``q_nope W_UK`` (bmm), ``mla_chunks`` (one query of 16 heads a program,
    576-wide scores, 512-wide values), ``W_UV`` (bmm);
    new = expanded: the context rows gathered (``context_rows``), ``kv_b_proj`` (one matmul,
    512 -> 16 x 256), ``mla_prefill_expanded`` (192-wide scores, 128-wide values).
    Both are timed whole (what the layer runs) and attention kernel alone.
Each time is the median of ``triton.testing.do_bench`` (eager) and, for decode, a CUDA graph
replay (what the engine runs). Outputs of old and new are compared before timing. Decode is
also timed with 32 and 64 heads a program where there are that many (``--heads 128``: V3 at
TP 1, where 16 heads a program read every latent tile 8 times).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))  # gpu_timing

import triton  # noqa: E402
from gpu_timing import graph_ms  # noqa: E402

from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.core.attention_batch import AttentionBatch  # noqa: E402
from tessellm.kernels.attention.common import _LOG2E  # noqa: E402
from tessellm.kernels.attention.mla import (TritonMLAAttentionKernel, mla_chunks,  # noqa: E402
                                            write_latent_rows)
from tessellm.kernels.attention.mla_decode import mla_decode  # noqa: E402
from tessellm.kernels.attention.mla_prefill import mla_prefill_expanded  # noqa: E402

H, C, R, NOPE, V, BS, DTYPE = 16, 512, 64, 128, 128, 16, torch.bfloat16  # --heads sets H
D = C + R
SCALE = (NOPE + R) ** -0.5


def bench(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def graph(fn, reps: int = 20) -> float:
    return graph_ms(fn, reps)


def batch(q_lens, ctx_lens, dev):
    """An AttentionBatch over scattered blocks, and a latent cache with every row written."""
    seq_lens = [c + q for c, q in zip(ctx_lens, q_lens)]
    nblocks = [triton.cdiv(s, BS) for s in seq_lens]
    pool = torch.randperm(sum(nblocks) + 8)
    tables = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32)
    used, slots, starts = 0, [], [0]
    for s, n in enumerate(nblocks):
        tables[s, :n] = pool[used:used + n]
        used += n
        slots += [int(tables[s, p // BS]) * BS + p % BS for p in range(ctx_lens[s], seq_lens[s])]
        starts.append(starts[-1] + q_lens[s])
    num_decodes = sum(1 for q in q_lens if q == 1) if all(q == 1 for q in q_lens) else 0
    b = AttentionBatch(
        num_tokens=starts[-1], num_seqs=len(seq_lens), num_decodes=num_decodes,
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=dev),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=dev),
        block_tables=tables.to(dev), slot_mapping=torch.tensor(slots, device=dev),
        max_query_len=max(q_lens), max_seq_len=max(seq_lens), query_start_loc_host=starts,
        seq_lens_host=seq_lens)
    cache = torch.randn(len(pool), BS, 1, D, device=dev).to(DTYPE)
    return b, cache


def kernel_for(kv_cache_dtype="auto") -> TritonMLAAttentionKernel:
    spec = AttentionSpec(num_heads=H, num_kv_heads=1, head_size=D, dtype=DTYPE, block_size=BS,
                         max_model_len=4096, max_num_seqs=256, mla_value_size=C,
                         kv_cache_dtype=kv_cache_dtype)
    return TritonMLAAttentionKernel(spec)


def decode_case(dev, results, n: int = 64, ctx: int = 2048):
    b, cache = batch([1] * n, [ctx - 1] * n, dev)
    q = torch.randn(n, H, D, device=dev, dtype=DTYPE)
    kernel = kernel_for()
    splits = kernel.num_splits(n)
    s2 = SCALE * _LOG2E
    old_out = torch.empty(n, H, C, device=dev, dtype=DTYPE)
    new_out = torch.empty_like(old_out)

    def old():
        mla_chunks(q, cache, old_out, b.query_start_loc, b.seq_lens, b.block_tables, s2, 1.0,
                   seq_offset=0, num_seqs=n, max_query_len=1, value_size=C)

    def new():
        mla_decode(q, cache, new_out, b.seq_lens, b.block_tables, s2, 1.0, num_decodes=n,
                   num_splits=splits, value_size=C, dot_precision="tf32")

    old(), new()
    torch.testing.assert_close(new_out.float(), old_out.float(), atol=2e-2, rtol=2e-2)
    fp8_cache = cache.to(torch.float8_e4m3fn)
    fp8_out = torch.empty_like(old_out)

    def new_fp8():
        mla_decode(q, fp8_cache, fp8_out, b.seq_lens, b.block_tables, s2, 1.0, num_decodes=n,
                   num_splits=splits, value_size=C, dot_precision="tf32")

    def heads_of(block_h):  # the split kernel with another head block (``block_h``)
        return lambda: mla_decode(q, cache, new_out, b.seq_lens, b.block_tables, s2, 1.0,
                                  num_decodes=n, num_splits=splits, value_size=C,
                                  dot_precision="tf32", block_h=block_h)

    nbytes = n * ctx * D * 2
    cases = [("old one-pass", old, nbytes), (f"new split-KV ({splits} splits)", new, nbytes),
             ("new split-KV, fp8 rows", new_fp8, nbytes // 2)]
    cases += [(f"new split-KV, {bh} heads a program", heads_of(bh), nbytes)
              for bh in (32, 64) if bh <= H]
    for _, fn, _ in cases[3:]:
        fn()
        torch.testing.assert_close(new_out.float(), old_out.float(), atol=2e-2, rtol=2e-2)
    for name, fn, size in cases:
        eager, g = bench(fn), graph(fn)
        results[f"decode b{n} ctx{ctx}: {name}"] = dict(eager_ms=eager, graph_ms=g,
                                                      gb_per_s=size / g / 1e6)
        print(f"decode b{n} ctx{ctx} {name:32s} eager {eager * 1e3:8.1f} us   graph "
              f"{g * 1e3:8.1f} us   {size / g / 1e6:7.0f} GB/s")


def prefill_case(dev, results, t: int = 2048):
    b, cache = batch([t], [0], dev)
    gen = torch.Generator(device=dev).manual_seed(0)
    q_nope = torch.randn(t, H, NOPE, device=dev, dtype=DTYPE, generator=gen)
    q_pe = torch.randn(t, H, R, device=dev, dtype=DTYPE, generator=gen)
    rows = torch.randn(t, D, device=dev, dtype=DTYPE, generator=gen)
    w_kv = (torch.randn(H * (NOPE + V), C, device=dev, generator=gen) / C ** 0.5).to(DTYPE)
    w_uk, w_uv = w_kv.view(H, NOPE + V, C).split([NOPE, V], dim=1)
    kernel = kernel_for()
    kernel.expanded_min_query = 1
    md = kernel.build_metadata(b)
    write_latent_rows(rows, cache, b.slot_mapping)
    s2 = SCALE * _LOG2E
    q_abs = torch.cat((torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe), -1)
    latent_out = torch.empty(t, H, C, device=dev, dtype=DTYPE)

    def old_attention():
        mla_chunks(q_abs, cache, latent_out, b.query_start_loc, b.seq_lens, b.block_tables, s2,
                   1.0, seq_offset=0, num_seqs=1, max_query_len=t, value_size=C)

    def old():
        qa = torch.cat((torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1), q_pe), -1)
        mla_chunks(qa, cache, latent_out, b.query_start_loc, b.seq_lens, b.block_tables, s2,
                   1.0, seq_offset=0, num_seqs=1, max_query_len=t, value_size=C)
        return torch.bmm(latent_out.transpose(0, 1), w_uv.transpose(1, 2)).transpose(0, 1)

    q_exp = torch.cat((q_nope, q_pe), -1)
    ctx = kernel.context_rows(cache, md, DTYPE)
    kv = torch.nn.functional.linear(ctx[:, :C], w_kv).view(-1, H, NOPE + V)
    k_nope, values = kv.split([NOPE, V], -1)

    def new_attention():
        return mla_prefill_expanded(q_exp, k_nope, ctx[:, C:], values, md.expanded.cu_q,
                                    md.expanded.cu_k, t, SCALE)

    def new():
        c = kernel.context_rows(cache, md, DTYPE)
        kv = torch.nn.functional.linear(c[:, :C], w_kv).view(-1, H, NOPE + V)
        kn, vv = kv.split([NOPE, V], -1)
        return kernel.forward_expanded(q_exp, kn, c[:, C:], vv, md, SCALE)

    torch.testing.assert_close(new().float(), old().float(), atol=3e-2, rtol=3e-2)
    pairs = t * (t + 1) // 2
    for name, fn, macs in (("old absorbed, layer part", old, pairs * H * (D + C)),
                           ("old absorbed, attention", old_attention, pairs * H * (D + C)),
                           ("new expanded, layer part", new, pairs * H * (NOPE + R + V)),
                           ("new expanded, attention", new_attention, pairs * H * (NOPE + R + V))):
        ms = bench(fn)
        results[f"prefill 1x{t}: {name}"] = dict(ms=ms, attention_tflops=2 * macs / ms / 1e9)
        print(f"prefill 1x{t} {name:28s} {ms * 1e3:9.1f} us   attention {2 * macs / ms / 1e9:6.1f} "
              "TFLOP/s (causal pairs only)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--decode-batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=2048, help="decode context length")
    ap.add_argument("--prefill-len", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16,
                    help="query heads a GPU (16: V2-Lite, or V3 at TP 8; 128: V3 at TP 1)")
    args = ap.parse_args()
    global H
    H = args.heads
    dev = torch.device("cuda")
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}")
    results = {"device": torch.cuda.get_device_name()}
    decode_case(dev, results, args.decode_batch, args.context)
    prefill_case(dev, results, args.prefill_len)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
