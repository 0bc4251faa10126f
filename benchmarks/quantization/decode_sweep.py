"""Launch shapes of the split-KV decode kernel at large batches (issue 22, F fp8), by measurement.

For each cache (fp8 e4m3 widened by ``cvt``, and bf16) and batch (256, 128; contexts uniform in
``--ctx``, Llama-3.1-8B heads: 32 q, 8 kv, dim 128, 16-token blocks, each sequence's blocks
contiguous as the engine's block manager hands them out to a prompt):

  1. every (BLOCK_N, num_warps, num_stages) of ``TILES`` with the grid sequence-major and
     head-major, at the kernel's own split count;
  2. the best few again at 2x and 4x the splits;
  3. the default and the winner at ``--long-ctx`` (workload L's contexts), for the record.

Each figure: microseconds per layer call from a CUDA graph of calls cycling over ``COPIES``
copies of the cache (so the L2 never holds the next call's keys), median of replays
(``tessellm.testing.timing.graph_time_us``), with the KV bytes read per microsecond.
A winner enters the table only if it beats the default by ``--min-gain`` (default 3%: the
spread between replays is ~1-2%), for ``--table-kinds`` only. ``--write-table PATH`` writes
``decode_table.py`` there.
``--warm-procs N`` compiles the variants in N processes first (Triton's disk cache), so the
timing process does not compile them one by one.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from tessellm.testing.timing import graph_time_us

H, KVH, D, BS = 32, 8, 128, 16
# (BLOCK_N, num_warps, num_stages); with the paged (indirect) loads, 3-4 stages give one
# shared-memory K/V buffer, 5-6 two, 7 three (decode_table.py)
TILES = {
    "fp8": [(64, 2, 3), (64, 4, 3), (64, 2, 5), (64, 4, 5), (32, 2, 3), (32, 2, 5), (32, 4, 5),
            (32, 2, 7), (32, 4, 7), (16, 2, 5), (16, 2, 7), (16, 1, 7), (128, 4, 3),
            (128, 4, 5), (64, 2, 7)],
    "bfloat16": [(64, 4, 3), (64, 2, 3), (64, 4, 5), (32, 4, 5), (32, 2, 5), (32, 4, 7),
                 (16, 2, 7), (128, 4, 3), (64, 8, 5)],
}
CACHES = {"fp8": (torch.float8_e4m3fn, "cvt"), "bfloat16": (torch.bfloat16, "auto")}
COPIES = 3


def _inputs(batch, ctx_lo, ctx_hi, cache_dtype, copies, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    seq_lens = (torch.randint(ctx_lo, ctx_hi + 1, (batch,), generator=g, device="cuda")
                + 1).to(torch.int32)
    nblk = (seq_lens + BS - 1) // BS
    width = int(nblk.max())
    starts = torch.cumsum(nblk, 0) - nblk
    tables = (starts[:, None] + torch.arange(width, device="cuda")[None, :]).to(torch.int32)
    tables = torch.where(torch.arange(width, device="cuda")[None, :] < nblk[:, None], tables, 0)
    total = int(nblk.sum())
    caches = [((torch.randn(total, BS, KVH, D, generator=g, device="cuda") * 2).to(cache_dtype),
               torch.randn(total, BS, KVH, D, generator=g, device="cuda").to(cache_dtype))
              for _ in range(copies)]
    q = torch.randn(batch, H, D, generator=g, device="cuda").to(torch.bfloat16)
    qsl = torch.arange(0, batch + 1, dtype=torch.int32, device="cuda")
    kv_bytes = int(seq_lens.sum()) * KVH * D * 2 * caches[0][0].element_size()
    return q, caches, qsl, seq_lens, tables, kv_bytes


def _kernel_splits(batch, kind):
    from tessellm.backends.spec import AttentionSpec
    from tessellm.kernels.attention import TritonAttentionKernel
    spec = AttentionSpec(num_heads=H, num_kv_heads=KVH, head_size=D, dtype=torch.bfloat16,
                         block_size=BS, kv_cache_dtype="fp8" if kind == "fp8" else "auto")
    return TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=256)


def _time(inp, convert, batch, tiles, head_major, splits, reps=6):
    """(us, GB/s) of one launch shape; ``convert``: ``fp8_convert`` ("auto" for 16-bit)."""
    from tessellm.kernels import attention as ta
    q, caches, qsl, seq_lens, tables, kv_bytes = inp
    ws = torch.empty(ta.decode_workspace_numel(batch, H, splits, D), device="cuda")
    out = torch.empty_like(q)
    calls = [lambda kc=kc, vc=vc: ta.decode_attention(
        q, kc, vc, out, qsl, seq_lens, tables, D ** -0.5, num_seqs=batch, num_splits=splits,
        workspace=ws, tiles=tiles, head_major=head_major, fp8_convert=convert)
        for kc, vc in caches]
    us = graph_time_us(calls, reps, replays=10)[0]
    return round(us, 1), round(kv_bytes / us / 1e3, 1)


def _variants(kind, base, args):
    """(tiles, head_major, splits, fp8_convert) at the kernel's split count."""
    converts = args.converts if kind == "fp8" else ["auto"]
    tiles = args.tiles or TILES[kind]
    return [(t, hm, base, c) for t in tiles for hm in args.grid_orders for c in converts]


def _default(kind, base, args):
    return (args.default or TILES[kind][0], False, base, CACHES[kind][1])


def _warm_one(job):
    kind, batch, ctx, variants = job
    torch.cuda.init()
    inp = _inputs(batch, *ctx, CACHES[kind][0], 1)
    for tiles, hm, splits, convert in variants:
        try:
            _time(inp, convert, batch, tiles, hm, splits, reps=1)
        except Exception:  # the timing process reports it
            pass
    return len(variants)


def warm(args):
    """Compile every variant in ``--warm-procs`` processes (Triton's disk cache)."""
    import multiprocessing as mp
    jobs = []
    per_kind = max(1, args.warm_procs // len(args.kinds))
    for kind in args.kinds:
        base = _kernel_splits(256, kind).num_splits(256)
        vs = _variants(kind, base, args)
        vs += [(t, hm, base * f, c) for t, hm, _, c in vs[:12] for f in args.split_factors]
        vs += [_default(kind, base, args)]
        jobs += [(kind, 256, tuple(args.ctx), vs[i::per_kind]) for i in range(per_kind)]
    with mp.get_context("spawn").Pool(len(jobs)) as pool:
        done = sum(pool.map(_warm_one, jobs))
    print(f"warmed {done} variants", flush=True)


def sweep_kind(kind, args, results):
    cache_dtype = CACHES[kind][0]
    table = {}
    for batch in args.batches:
        base = _kernel_splits(batch, kind).num_splits(batch)
        inp = _inputs(batch, *args.ctx, cache_dtype, COPIES)
        row = {}
        dflt = _default(kind, base, args)
        for v in [dflt] + _variants(kind, base, args):
            try:
                row[v] = _time(inp, v[3], batch, *v[:3])
            except Exception as exc:  # a shape that does not fit (shared memory, registers)
                print(f"  {kind} b{batch} {v}: {type(exc).__name__}", flush=True)
        top = sorted(row, key=lambda k: row[k][0])[:3]
        for tiles, hm, _, convert in top:
            for f in args.split_factors:
                try:
                    row[(tiles, hm, base * f, convert)] = _time(inp, convert, batch, tiles, hm,
                                                                base * f)
                except Exception as exc:
                    print(f"  {kind} b{batch} {tiles} s{base * f}: {type(exc).__name__}")
        default = row[dflt]
        best = min(row, key=lambda k: row[k][0])
        gain = default[0] / row[best][0] - 1
        name = f"{kind} batch {batch} ctx {args.ctx[0]}-{args.ctx[1]}"
        results[name] = {"default": [*dflt, *default],
                         "best": [*best, *row[best], round(100 * gain, 1)],
                         "all": {f"{t} hm={int(hm)} s{s} {c}": v for (t, hm, s, c), v in
                                 sorted(row.items(), key=lambda kv: kv[1][0])}}
        print(f"{name}: default {default} best {best} {row[best]} (+{100 * gain:.1f}%)",
              flush=True)
        if gain >= args.min_gain and batch >= 128 and kind in args.table_kinds:
            entry = (*best[0], best[1], best[2] if best[2] != base else 0)
            table[(kind, batch)] = entry + ((best[3],) if best[3] != CACHES[kind][1] else ())
        if args.long_ctx and batch == max(args.batches):
            del inp
            inp = _inputs(batch, *args.long_ctx, cache_dtype, 2)
            long_row = {"default": _time(inp, dflt[3], batch, *dflt[:3]),
                        "best": _time(inp, best[3], batch, *best[:3])}
            results[f"{kind} batch {batch} ctx {args.long_ctx[0]}-{args.long_ctx[1]}"] = long_row
            print(f"  long ctx {args.long_ctx}: {long_row}", flush=True)
        del inp
        torch.cuda.empty_cache()
    return table


def write_table(path, table, note):
    with open(path) as f:
        src = f.read()
    head, sep, _ = src.partition("DECODE_TABLE: dict")
    assert sep, f"{path} has no DECODE_TABLE"
    lines = [f"DECODE_TABLE: dict[tuple[str, int], tuple] = {{  # {note}"]
    lines += [f"    {k!r}: {v!r}," for k, v in sorted(table.items())] + ["}"]
    tail = src[src.index("\n\n\ndef cache_kind"):]
    with open(path, "w") as f:
        f.write(head + "\n".join(lines) + tail)


def _tile(text):
    return tuple(int(x) for x in text.split(","))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kinds", nargs="+", default=["fp8", "bfloat16"])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 128])
    p.add_argument("--ctx", type=int, nargs=2, default=[512, 768])
    p.add_argument("--long-ctx", type=int, nargs=2, default=[1024, 2048])
    p.add_argument("--min-gain", type=float, default=0.03)
    p.add_argument("--table-kinds", nargs="+", default=["fp8", "bfloat16"],
                   help="kinds whose winners enter the table (the others: measured only)")
    p.add_argument("--warm-procs", type=int, default=0)
    p.add_argument("--tiles", type=_tile, nargs="+", default=None,
                   help="BLOCK_N,warps,stages ... (default: TILES of the kind)")
    p.add_argument("--default", type=_tile, default=None,
                   help="the shape gains are measured against (default: TILES[kind][0])")
    p.add_argument("--grid-orders", type=lambda x: bool(int(x)), nargs="+", default=[False, True],
                   help="0: sequence-major grid, 1: head-major")
    p.add_argument("--split-factors", type=int, nargs="*", default=[2, 4],
                   help="the best 3 shapes again at these multiples of the kernel's splits")
    p.add_argument("--converts", nargs="+", default=["cvt"],
                   help="fp8 widenings to try (tessellm.kernels.attention.common._FP8_CONVERT)")
    p.add_argument("--out", default=None)
    p.add_argument("--write-table", default=None)
    args = p.parse_args()
    t0 = time.perf_counter()
    if args.warm_procs:
        warm(args)
        print(f"compiled in {time.perf_counter() - t0:.0f} s", flush=True)
    results, table = {"device": torch.cuda.get_device_name()}, {}
    for kind in args.kinds:
        table.update(sweep_kind(kind, args, results))
        results["table"] = {repr(k): v for k, v in table.items()}
        if args.out:
            with open(args.out, "w") as f:
                json.dump(results, f, indent=1)
    print("table", table, flush=True)
    if args.write_table:
        write_table(args.write_table, table, f"{results['device']}, {time.strftime('%Y-%m-%d')}")
    print(f"done in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
