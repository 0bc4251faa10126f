"""Sweep of the bitsandbytes 4-bit decode GEMV (``gemm/bnb4.py``) at Llama-3.1-8B layer shapes
(qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096), 1 and 2 rows by default
(``--rows 1,2,4,8``: 8 is two launches of 4), against dequantize + cuBLAS and bf16 cuBLAS,
CUDA-graph timed with the L2 flushed before each call (gpu_timing.gtime). One process; about a
minute on an H100 (a compile per variant and row count), more with ``--check``.

    python3 benchmarks/kernels/bench_bnb4_sweep.py --check --json OUT.json
        [--no-flush] [--wide] [--only -pair] [--rows 1,2]

Variants: the kinds (``KINDS``: the table lookup ``t16`` / ``pair`` / ``gather``, ``xw`` x read
as 32-bit words, ``q16`` the codes' row stride passed for 16-byte loads, ``last`` split K's
planes added by each tile's last program rather than torch) at each launch shape
(``BLOCK_N`` output rows a program, ``BKB`` blocks of 64 a step, i.e. ``BKB * 32`` bytes a row
a step, ``num_warps``, ``num_stages``, x loaded as whole tiles ``xt`` or 2-D and converted
``x2`` (``X_TILE``), the most K splits). ``--check`` first runs every variant against x @ the
dequantized weight (float64 sums) on the four shapes (NF4, bf16 x), and one of each kind,
and ``X_TILE`` also on three shapes with K tails or blocks of 128, FP4, fp16 / float32
x; it drops those that fail (listed, and in the JSON) and prints a line per case.
Each timed variant prints one line: us a call, TB/s of codes + absmax (0.5 + 4/64 bytes a
weight, read once), the split it took, the largest error over the largest output (``BAD``
above 1e-2: never picked). Then the best per (shape, rows) next to dequantize + cuBLAS and bf16
cuBLAS (us, TB/s of its 2 bytes a weight), the best per kind, and what the numbers imply:
``GEMV_CONFIGS`` (per row count the variant of least total time over the four shapes, ready to
paste into ``bnb4.py``) and ``GEMV_MAX_M`` (the most rows at which the GEMV, with those
configs, beats dequantize + cuBLAS on every shape). ``--json``: all of it.
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
BAD = 1e-2
# (LUT, X_WORDS, WIDE_Q, SPLIT_LAST) tried at every launch shape: the session-28 kernel, then
# x as words, then 16-byte code loads, then the other two lookups with both
# (``bnb4._bnb4_weights``), then the t16 one with split K added in the launch
KINDS = (("t16", False, False, False), ("t16", True, False, False), ("t16", True, True, False),
         ("pair", True, True, False), ("gather", True, True, False), ("t16", True, True, True))
# (BLOCK_N, BKB, num_warps): session 28's best launch shapes at 1 and 2 rows
LAUNCHES = ((8, 8, 4), (16, 8, 4), (8, 16, 4), (16, 16, 8))
# --check: shapes besides SHAPES with K tails (EVEN_K off: 17 or 9 blocks), blocks of 128
CHECK_SHAPES = ((300, 1088, 64), (96, 1152, 128), (6144, 4096, 128))


def variants(wide: bool) -> list[dict]:
    """The variants tried: ``KINDS`` x ``LAUNCHES`` x x loaded both ways (``X_TILE``), 3
    stages, at most 16 K splits (48; about 100 compiles at 1 and 2 rows). ``wide``: every
    lookup with and without words, 16-byte loads, the in-launch split sum at 1-16 output
    rows, 8-32 blocks a step,
    4 and 8 warps, 2-4 stages, 1 or 16 splits (each row's float32 accumulator tile at most 32
    registers a thread: ``BLOCK_N * BKB * 32 <= 1024 * num_warps``; ~7,500: hours)."""
    if not wide:
        return [dict(BLOCK_N=bn, BKB=bkb, num_warps=warps, num_stages=3, max_split=16,
                     X_TILE=x_tile, LUT=bnb4.LUTS[lut], X_WORDS=xw, WIDE_Q=wq,
                     SPLIT_LAST=last)
                for (lut, xw, wq, last), (bn, bkb, warps), x_tile in itertools.product(
                    KINDS, LAUNCHES, (True, False))]
    out = []
    for bn, bkb, warps, stages, split, x_tile, lut, xw, wq, last in itertools.product(
            (1, 2, 4, 8, 16), (8, 16, 32), (4, 8), (2, 3, 4), (1, 16), (True, False),
            bnb4.LUTS.values(), (False, True), (False, True), (False, True)):
        if bn * bkb * 32 <= 1024 * warps:
            out.append(dict(BLOCK_N=bn, BKB=bkb, num_warps=warps, num_stages=stages,
                            max_split=split, X_TILE=x_tile, LUT=lut, X_WORDS=xw, WIDE_Q=wq,
                            SPLIT_LAST=last))
    return out


def name(v: dict) -> str:
    lut = {i: k for k, i in bnb4.LUTS.items()}[v["LUT"]]
    return (f"n{v['BLOCK_N']}-b{v['BKB']}-w{v['num_warps']}-s{v['num_stages']}"
            f"-{'xt' if v['X_TILE'] else 'x2'}-k{v['max_split']}-{lut}"
            f"{'-xw' if v['X_WORDS'] else ''}{'-q16' if v['WIDE_Q'] else ''}"
            f"{'-last' if v['SPLIT_LAST'] else ''}")


def kind(v: dict) -> str:
    """The variant's lookup, words and loads, without its launch shape."""
    return name(v).split("-", 6)[-1]


def max_err(got: torch.Tensor, x: torch.Tensor, wref: torch.Tensor) -> float:
    """The largest error over its tolerance: float32 reassociation (1e-5 of ``|x| @ |w|``)
    plus, for 16-bit x, the output's rounding (2^-7 of it); above 1: wrong."""
    want = x.double() @ wref.double().t()
    tol = 1e-5 * (x.double().abs() @ wref.double().abs().t())
    if x.dtype != torch.float32:
        tol = tol + 2 ** -7 * want.abs()
    return ((got.double() - want).abs() / tol.clamp(min=1e-30)).max().item()


def check(vs: list[dict], rows: tuple, device: str = "cuda") -> dict:
    """Every variant against x @ the dequantized weight (``max_err``) on the Llama shapes, NF4,
    bf16 x at each row count (the launches the sweep compiles anyway); one variant of each kind
    and ``X_TILE`` (``representatives``) also on ``CHECK_SHAPES`` (K tails, blocks
    of 128), FP4, and fp16 / float32 x at one row. Checking every variant on every case compiled
    each one per x dtype, row count, K tail and block size (~1,000 compiles: over 300 s with no
    output on an H100). Prints a line per case as it goes. Returns the variants that fail, with
    their worst case (dropped from the timing); a representative that fails takes its kind and
    ``X_TILE``'s other launch shapes with it."""
    failed: dict = {}
    few = representatives(vs)
    cases = [(n, k, 64) for n, k in SHAPES.values()] + list(CHECK_SHAPES)
    t0, done = time.time(), 0
    for (n, k, bs), qtype in itertools.product(cases, ("nf4", "fp4")):
        w = quantize_bnb4(torch.randn(n, k, device=device) * 0.02, qtype, bs)
        wref = w.dequantize(torch.float32)
        common = (n, k) in SHAPES.values() and bs == 64 and qtype == "nf4"
        for dtype, m in [(torch.bfloat16, m) for m in rows] + [(torch.float16, 1),
                                                                (torch.float32, 1)]:
            x = torch.randn(m, k, device=device, dtype=dtype)
            chosen = vs if common and dtype == torch.bfloat16 else few
            for v in chosen:
                try:
                    err = max_err(bnb4.bnb4_gemv(x, w, config=v), x, wref)
                except Exception as e:  # noqa: BLE001 - a variant this GPU refuses
                    err, why = float("inf"), f"{type(e).__name__}: {str(e)[:80]}"
                else:
                    why = f"error {err:.2f} x its tolerance"
                if err > 1 and name(v) not in failed:
                    failed[name(v)] = f"{n}x{k} blocks {bs} {qtype} {dtype} rows {m}: {why}"
            done += len(chosen)
            print(f"check {n}x{k} blocks {bs} {qtype} {str(dtype)[6:]} rows {m}: {len(chosen)} "
                  f"variants ({done} runs, {len(failed)} failed, {time.time() - t0:.0f} s)",
                  flush=True)
    for rep in few:  # a representative's failure is its kind's: the same code at other sizes
        if name(rep) in failed:
            for v in vs:
                if _code_path(v) == _code_path(rep) and name(v) not in failed:
                    failed[name(v)] = f"as {name(rep)}: {failed[name(rep)]}"
    print(f"check: {len(vs) - len(failed)} of {len(vs)} variants equal the reference on the "
          f"Llama shapes (nf4, bf16 rows {rows}); {len(few)} of them also on "
          f"{len(CHECK_SHAPES)} more shapes x nf4/fp4, fp16/f32 1 row", flush=True)
    for v, why in failed.items():
        print(f"  FAILED {v}: {why}", flush=True)
    return failed


def _code_path(v: dict) -> tuple:
    return kind(v), v["X_TILE"]


def representatives(vs: list[dict]) -> list[dict]:
    """The first variant of each kind (lookup, words, loads, split sum) and ``X_TILE``: the
    kernel's code paths (the K tails reach ``EVEN_K`` off at any ``BKB``); the launch's other
    sizes only tile the same code."""
    seen, out = set(), []
    for v in vs:
        key = _code_path(v)
        if key not in seen:
            seen.add(key)
            out.append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--wide", action="store_true", help="more launch shapes (slow)")
    ap.add_argument("--only", default="", help="variants whose name holds this, e.g. -pair")
    ap.add_argument("--rows", default="1,2", help="x rows, e.g. 1,2,4,8 (8: two launches)")
    ap.add_argument("--check", action="store_true",
                    help="first check every variant against the reference; drop failures")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    flush, reps, rows = not args.no_flush, 10, tuple(int(r) for r in args.rows.split(","))
    torch.manual_seed(0)
    vs = [v for v in variants(args.wide) if args.only in name(v)]
    t0 = time.time()
    failed = check(vs, rows) if args.check else {}
    vs = [v for v in vs if name(v) not in failed]
    print(f"{len(vs)} variants; us a call; TB/s of codes + absmax; err vs x @ dequant (f32)")
    results, base = [], {}
    for shape, (n, k) in SHAPES.items():
        w = quantize_bnb4(torch.randn(n, k, device="cuda") * 0.02, "nf4").to("cuda")
        wd, wref = w.dequantize(torch.bfloat16), w.dequantize(torch.float32)
        code_bytes = n * k // 2 + w.absmax.numel() * 4
        for m in rows:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            want = x.float() @ wref.t()
            b = base[shape, m] = dict(
                bf16=gtime(lambda: F.linear(x, wd), reps, flush),
                deq=gtime(lambda: F.linear(x, bnb4.bnb4_dequantize(w, x.dtype)), reps, flush))
            b["bf16_tbs"] = n * k * 2 / b["bf16"] / 1e6
            print(f"{shape} rows {m}: bf16 {b['bf16']:.1f} ({b['bf16_tbs']:.2f} TB/s)  "
                  f"dequant+cuBLAS {b['deq']:.1f}  ({time.time() - t0:.0f} s in)", flush=True)
            for v in vs:
                try:
                    got = bnb4.bnb4_gemv(x, w, config=v)
                    err = ((got.float() - want).abs().max() / want.abs().max()).item()
                    us = gtime(lambda: bnb4.bnb4_gemv(x, w, config=v), reps, flush)
                except Exception as e:  # a launch shape this GPU refuses (resources)
                    print(f"  {name(v):44} failed: {type(e).__name__}: {str(e)[:80]}")
                    continue
                split = bnb4.gemv_config(min(m, bnb4.GEMV_ROWS), n, k, w.blocksize, False,
                                         bnb4._num_sms(0), v)["SPLIT_K"]
                row = dict(shape=shape, rows=m, variant=name(v), kind=kind(v), config=v, us=us,
                           split=split, tbs=code_bytes / us / 1e6, err=err)
                results.append(row)
                print(f"  {name(v):44} {us:8.1f} {row['tbs']:6.2f} split {split:2d} "
                      f"err {err:.1e}{' BAD' if err > BAD else ''}", flush=True)
    table, max_m = summarize(results, base, rows)
    print(f"sweep took {time.time() - t0:.0f} s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "flush": flush, "rows": rows,
                       "check_failed": failed,
                       "base": [dict(shape=s, rows=m, **b) for (s, m), b in base.items()],
                       "results": results, "GEMV_CONFIGS": table, "GEMV_MAX_M": max_m},
                      f, indent=2)


def summarize(results: list[dict], base: dict, rows: tuple) -> tuple[dict, int]:
    """The best per (shape, rows) and per kind (lookup, words, loads); the table and the
    switch the numbers imply: ``GEMV_CONFIGS`` (per row count the variant of least total time
    over the four shapes; row counts not swept keep bnb4.py's entry) and ``GEMV_MAX_M`` (the
    most rows at which the GEMV beats dequantize + cuBLAS on every shape)."""
    good = [r for r in results if r["err"] <= BAD]
    print(f"\n{'shape':8} {'rows':>4} {'best':>44} {'us':>7} {'TB/s':>5} {'deq':>7} "
          f"{'bf16':>7} {'TB/s':>5} {'err':>8}")
    for (shape, m), b in base.items():
        mine = [r for r in good if r["shape"] == shape and r["rows"] == m]
        if mine:
            r = min(mine, key=lambda r: r["us"])
            print(f"{shape:8} {m:4d} {r['variant']:>44} {r['us']:7.1f} {r['tbs']:5.2f} "
                  f"{b['deq']:7.1f} {b['bf16']:7.1f} {b['bf16_tbs']:5.2f} {r['err']:8.1e}")
    kinds = sorted({r["kind"] for r in good})
    print(f"\nbest us (TB/s) per kind:\n{'shape':8} {'rows':>4} "
          + " ".join(f"{k:>16}" for k in kinds))
    for (shape, m) in base:
        cells = []
        for k in kinds:
            mine = [r for r in good if r["shape"] == shape and r["rows"] == m and r["kind"] == k]
            r = min(mine, key=lambda r: r["us"]) if mine else None
            cells.append(f"{r['us']:8.1f} ({r['tbs']:4.2f})" if r else f"{'-':>16}")
        print(f"{shape:8} {m:4d} " + " ".join(cells))
    table, chosen = dict(bnb4.GEMV_CONFIGS), {}
    for m in rows:
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
            if m in table:
                table[m] = cfg
    print("\nGEMV_CONFIGS = {")
    for m, cfg in table.items():
        print(f"    {m}: dict({', '.join(f'{k}={v}' for k, v in cfg.items())}),")
    print("}")
    max_m = 0
    for m in rows:  # the GEMV must win at every shape and every row count up to m
        if m not in chosen or any(chosen[m][s] >= base[s, m]["deq"] for s in SHAPES):
            break
        max_m = m
    print(f"GEMV_MAX_M = {max_m}  (of rows {rows}; per rows, chosen config us / dequant+cuBLAS "
          "us / bf16 us: " + "; ".join(
              f"{m}: " + ", ".join(f"{s} {chosen[m][s]:.1f}/{base[s, m]['deq']:.1f}/"
                                   f"{base[s, m]['bf16']:.1f}" for s in SHAPES)
              for m in chosen) + ")")
    return table, max_m


if __name__ == "__main__":
    main()
