"""Launch-shape sweep of the bitsandbytes 4-bit decode GEMV (``gemm/bnb4.py``) at Llama-3.1-8B
layer shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096), 1, 2, 4
and 8 rows (8: two launches of 4), against dequantize + cuBLAS and bf16 cuBLAS, CUDA-graph
timed with the L2 flushed before each call (gpu_timing.gtime). One process, about two minutes
on an H100 (a compile per variant and row count).

    python3 benchmarks/kernels/bench_bnb4_sweep.py [--no-flush] [--wide] [--only -xt-] [--json PATH]

Each variant (``BLOCK_N`` output rows a program, ``BKB`` blocks of 64 a step, i.e. ``BKB * 32``
bytes a row a step, ``num_warps``, ``num_stages``, x loaded as whole tiles ``xt`` or 2-D and
converted ``x2`` (``X_TILE``), the most K splits) prints one line: us a
call, TB/s of codes + absmax (0.5 + 4/64 bytes a weight, read once), the split it took, and
its correctness check, the largest error over the largest output against x @ the dequantized
weight in float32 (``BAD`` above 1e-2: never picked). Then the best per (shape, rows), and
what the numbers imply: ``GEMV_CONFIGS`` (per row count the variant of least total time over
the four shapes, ready to paste into ``bnb4.py``) and ``GEMV_MAX_M`` (the most rows at which
the GEMV, with those configs, beats dequantize + cuBLAS on every shape; 8 rows with the 4-row
entry, as ``bnb4_gemv`` launches them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.kernels.gemm import bnb4  # noqa: E402
from tessellm.quantization.bnb import quantize_bnb4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 2, 4, 8)
BAD = 1e-2


def variants(wide: bool) -> list[dict]:
    """The launch shapes tried: each row's float32 accumulator tile at most 32 registers a
    thread (``BLOCK_N * BKB * 32 <= 1024 * num_warps``), 256 to 1024 bytes a row a step, x
    loaded both ways (``X_TILE``). By default 3 stages, 4 warps (8 where the tile needs them),
    at most 1 or 16 K splits (44 variants, ~90 compiles: about two minutes); ``wide``: 1-4
    stages, 4 and 8 warps, 1, 4 or 16 splits (~600 variants: many minutes)."""
    out = []
    for bn, bkb, warps, stages, split, x_tile in itertools.product(
            (1, 2, 4, 8, 16), (8, 16, 32), (4, 8), (1, 2, 3, 4) if wide else (3,),
            (1, 4, 16) if wide else (1, 16), (True, False)):
        fits = bn * bkb * 32 <= 1024 * warps
        if not fits or (not wide and (bn == 1 or (warps == 8 and bn * bkb * 32 <= 4096))):
            continue
        out.append(dict(BLOCK_N=bn, BKB=bkb, num_warps=warps, num_stages=stages,
                        max_split=split, X_TILE=x_tile))
    return out


def name(v: dict) -> str:
    return (f"n{v['BLOCK_N']}-b{v['BKB']}-w{v['num_warps']}-s{v['num_stages']}"
            f"-{'xt' if v['X_TILE'] else 'x2'}-k{v['max_split']}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--wide", action="store_true", help="more warps, stages, splits (slow)")
    ap.add_argument("--only", default="", help="variants whose name holds this, e.g. -xt-")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    flush, reps = not args.no_flush, 10
    torch.manual_seed(0)
    vs = [v for v in variants(args.wide) if args.only in name(v)]
    t0 = time.time()
    print(f"{len(vs)} variants; us a call; TB/s of codes + absmax; err vs x @ dequant (f32)")
    results, base = [], {}
    for shape, (n, k) in SHAPES.items():
        w = quantize_bnb4(torch.randn(n, k, device="cuda") * 0.02, "nf4").to("cuda")
        wd, wref = w.dequantize(torch.bfloat16), w.dequantize(torch.float32)
        code_bytes = n * k // 2 + w.absmax.numel() * 4
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ wref.t()
            base[shape, m] = dict(
                bf16=gtime(lambda: F.linear(x, wd), reps, flush),
                deq=gtime(lambda: F.linear(x, bnb4.bnb4_dequantize(w, x.dtype)), reps, flush))
            print(f"{shape} rows {m}: bf16 {base[shape, m]['bf16']:.1f}  dequant+cuBLAS "
                  f"{base[shape, m]['deq']:.1f}  ({time.time() - t0:.0f} s in)", flush=True)
            for v in vs:
                try:
                    got = bnb4.bnb4_gemv(x, w, config=v)
                    err = ((got.float() - want).abs().max() / want.abs().max()).item()
                    us = gtime(lambda: bnb4.bnb4_gemv(x, w, config=v), reps, flush)
                except Exception as e:  # a launch shape this GPU refuses (resources)
                    print(f"  {name(v):27} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                split = bnb4.gemv_config(min(m, bnb4.GEMV_ROWS), n, k, w.blocksize, False,
                                         bnb4._num_sms(0), v)["SPLIT_K"]
                row = dict(shape=shape, rows=m, variant=name(v), config=v, us=us, split=split,
                           tbs=code_bytes / us / 1e6, err=err)
                results.append(row)
                print(f"  {name(v):27} {us:8.1f} {row['tbs']:6.2f} split {split:2d} "
                      f"err {err:.1e}{' BAD' if err > BAD else ''}", flush=True)
    summarize(results, base)
    print(f"sweep took {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "flush": flush,
                       "base": [dict(shape=s, rows=m, **b) for (s, m), b in base.items()],
                       "results": results}, f, indent=2)


def summarize(results: list[dict], base: dict) -> None:
    """The best per (shape, rows); the table and the switch the numbers imply."""
    good = [r for r in results if r["err"] <= BAD]
    print(f"\n{'shape':8} {'rows':>4} {'best':>27} {'us':>7} {'TB/s':>5} {'deq':>7} "
          f"{'bf16':>7} {'err':>8}")
    for (shape, m), b in base.items():
        mine = [r for r in good if r["shape"] == shape and r["rows"] == m]
        if mine:
            r = min(mine, key=lambda r: r["us"])
            print(f"{shape:8} {m:4d} {r['variant']:>27} {r['us']:7.1f} {r['tbs']:5.2f} "
                  f"{b['deq']:7.1f} {b['bf16']:7.1f} {r['err']:8.1e}")
    table, chosen = {}, {}
    for m in ROWS:
        totals = {}
        for r in good:
            if r["rows"] == m:
                totals.setdefault(r["variant"], [r["config"], 0.0, 0])
                totals[r["variant"]][1] += r["us"]
                totals[r["variant"]][2] += 1
        whole = [t for t in totals.values() if t[2] == len(SHAPES)]
        if m > bnb4.GEMV_ROWS:  # launches of GEMV_ROWS rows: the table's last entry
            whole = [t for t in whole if t[0] == table.get(bnb4.GEMV_ROWS)]
        if whole:
            cfg, total, _ = min(whole, key=lambda t: t[1])
            chosen[m] = {r["shape"]: r["us"] for r in good
                         if r["rows"] == m and r["config"] == cfg}
            if m <= bnb4.GEMV_ROWS:
                table[m] = cfg
    print("\nGEMV_CONFIGS = {")
    for m, cfg in table.items():
        print(f"    {m}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
    print("}")
    max_m = 0
    for m in ROWS:  # the GEMV must win at every shape and every row count up to m
        if m not in chosen or any(chosen[m][s] >= base[s, m]["deq"] for s in SHAPES):
            break
        max_m = m
    print(f"GEMV_MAX_M = {max_m}  (per rows, chosen config us / dequant+cuBLAS us: " + "; ".join(
        f"{m}: " + ", ".join(f"{s} {chosen[m][s]:.1f}/{base[s, m]['deq']:.1f}" for s in SHAPES)
        for m in chosen) + ")")


if __name__ == "__main__":
    main()
