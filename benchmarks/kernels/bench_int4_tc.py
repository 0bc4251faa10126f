"""Dense AWQ / GPTQ int4 (W4A16) on one GPU: the tensor-core GEMM on the load-time tc layout
(``kernels/gemm/int4_tc.py``) against bf16 cuBLAS and the int4 path before it, Llama-3.1-8B
layer shapes (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096) at 1, 4, 16,
64, 256, 1024 rows, CUDA-graph timed with the L2 flushed before each call (gpu_timing.gtime).

    python3 benchmarks/kernels/bench_int4_tc.py [--sym] [--no-flush] [--json PATH] [--sweep]

Columns (us a call, effective TB/s of the weight read in brackets): ``bf16`` F.linear on the
dense weight; ``old`` TritonQuantOps.int4_mm without the tc layout (TESSELLM_INT4_TC=0: GEMV at
1-4 rows, the checkpoint-layout tiled GEMM to 511, dequantize + cuBLAS from 512); ``new``
TritonQuantOps.int4_mm as it is now, on the layout its default keeps (``path``: tcgv / tc /
deq with the tc codes only, TESSELLM_INT4_TC_GEMV on, the default; gemv / tc / deq with both
layouts); ``tc`` int4_tc_gemm at every row count (1-4 rows too); ``tcgemv`` int4_tc_gemv at 1-4
rows; ``tcdeq`` the tc dequantize kernel then cuBLAS (``INT4_TC_DEQUANT_MIN_M``, 160).
``err``: the new path's largest error over the largest output against x @ the dequantized
weight (float32).
Then one ``layer M=...`` line per row count (the four products summed).
``--sweep`` (instead of the table): int4_tc_gemm over (BLOCK_N, num_warps, num_stages) and the
split-K target (programs a multiprocessor) at 16, 64 and 256 rows, o / gate_up / down, one line
a shape and row count: the default's time and the best setting's (``int4_tc.int4_tc_config``'s tuple).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.kernels.gemm import int4_tc as tc  # noqa: E402
from tessellm.kernels.gemm import quant_ops  # noqa: E402
from tessellm.kernels.gemm.gemv_int4 import INT4_GEMV_MAX_M  # noqa: E402
from tessellm.quantization.packed import Int4Weight, pack_int4, quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 4, 16, 64, 256, 1024)
KEYS = ("bf16", "old", "new", "tc", "tcgemv", "tcdeq")


def _weight(n, k, sym):
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s, z = quantize_int4(w, 128, symmetric=sym)
    if sym:
        seg = Int4Weight(pack_int4(q), s.half(), None, 8, 128)
    else:
        seg = Int4Weight(pack_int4(q), s.half(), -(z.float() * s.float()).half(), 0, 128)
    seg.tc_qweight = tc.int4_tc_pack(seg.qweight)
    return seg


def _without_tc(w: Int4Weight) -> Int4Weight:
    return Int4Weight(w.qweight, w.scales, w.offsets, w.zero_point, w.group_size, w.perm)


def sweep(flush: bool, sym: bool) -> None:
    print(f"{torch.cuda.get_device_name()} | int4_tc sweep, us (L2 {'flushed' if flush else 'warm'})",
          flush=True)
    settings = [(64, 4, 3), (64, 4, 4), (128, 4, 3), (128, 8, 3)]
    for name, (n, k) in SHAPES.items():
        if name == "qkv":  # (o's K, between o's and gate_up's N)
            continue
        w = _weight(n, k, sym)
        for m in (16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = gtime(lambda: tc.int4_tc_gemm(x, w), flush=flush)
            bm = tc.int4_tc_config(m, n, k, False)["BLOCK_M"]
            best = (base, "default")
            for bn, wp, st in settings:
                for pps in (1, 2, 4, 8):
                    cfg = (bm, bn, wp, st, pps)
                    try:
                        us = gtime(lambda: tc.int4_tc_gemm(x, w, config=cfg), flush=flush)
                    except Exception as e:  # noqa: BLE001 (a setting that fails: skip it)
                        print(f"sweep {name} M={m} {cfg}: {type(e).__name__}", flush=True)
                        break
                    if us < best[0]:
                        best = (us, f"config={cfg}")
            print(f"sweep {name:8} M={m:<4}: default {base:7.1f} us, best {best[0]:7.1f} us "
                  f"({best[1]})", flush=True)
        del w
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sym", action="store_true", help="GPTQ symmetric (zero point 8)")
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--json", default=None)
    ap.add_argument("--sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    flush = not args.no_flush
    if args.sweep:
        return sweep(flush, args.sym)
    ops = quant_ops.TritonQuantOps()
    old_ops = quant_ops.TritonQuantOps()
    old_ops.int4_tc = False
    rows_out, totals = [], {}
    print(f"{torch.cuda.get_device_name()} | groups of 128, {'sym' if args.sym else 'asym'}, "
          f"L2 {'flushed' if flush else 'warm'} | us (TB/s)", flush=True)
    print(f"{'shape':8}{'M':>5} {'bf16':>14} {'old':>14} {'new':>14} {'path':>5} "
          f"{'tc':>8} {'tcgemv':>8} {'tcdeq':>8} {'new/bf16':>8} {'err':>8}", flush=True)
    for name, (n, k) in SHAPES.items():
        w = _weight(n, k, args.sym)
        w_old = _without_tc(w)
        # "new" on the layout the default keeps: the tc codes only where int4_tc_gemv is on
        w_new = Int4Weight(w.qweight.new_empty(0, w.qweight.shape[1]) if ops.int4_tc_gemv
                           else w.qweight, w.scales, w.offsets, w.zero_point, w.group_size,
                           w.perm)
        w_new.tc_qweight = w.tc_qweight
        dense = w.dequantize(torch.bfloat16).cuda()
        wbytes = w.qweight.nbytes + w.scales.nbytes + (w.offsets.nbytes if w.offsets is not None
                                                       else 0)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            deq_m = min(ops.dequant_min_m, quant_ops.INT4_TC_DEQUANT_MIN_M)
            if w_new.qweight.shape[0] > 0:  # both layouts (TESSELLM_INT4_TC_GEMV=0)
                path = "gemv" if m <= INT4_GEMV_MAX_M else "deq" if m >= deq_m else "tc"
            else:
                path = "tcgv" if m == 1 else "deq" if m >= deq_m else "tc"
            ref = x.float() @ dense.float().t()
            got = ops.int4_mm(x, w_new).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            if m <= 4:  # the tc GEMV's error too (the larger of the two is printed)
                g2 = tc.int4_tc_gemv(x, w).float()
                err = max(err, ((g2 - ref).abs().max() / ref.abs().max()).item())
            t = dict(bf16=gtime(lambda: F.linear(x, dense), flush=flush),
                     old=gtime(lambda: old_ops.int4_mm(x, w_old), flush=flush),
                     new=gtime(lambda: ops.int4_mm(x, w_new), flush=flush),
                     tc=gtime(lambda: tc.int4_tc_gemm(x, w), flush=flush),
                     tcgemv=(gtime(lambda: tc.int4_tc_gemv(x, w), flush=flush) if m <= 4
                             else float("nan")),
                     tcdeq=gtime(lambda: F.linear(x, tc.int4_tc_dequantize(w, x.dtype)),
                                 flush=flush))
            tb = {key: (dense.nbytes if key == "bf16" else wbytes) / (us * 1e-6) / 1e12
                  for key, us in t.items()}
            for key, us in t.items():
                totals[(m, key)] = totals.get((m, key), 0.0) + us
            print(f"{name:8}{m:>5} {t['bf16']:7.1f} ({tb['bf16']:4.2f}) {t['old']:7.1f} "
                  f"({tb['old']:4.2f}) {t['new']:7.1f} ({tb['new']:4.2f}) {path:>5} "
                  f"{t['tc']:8.1f} {t['tcgemv']:8.1f} {t['tcdeq']:8.1f} "
                  f"{t['new'] / t['bf16']:8.2f} {err:8.1e}",
                  flush=True)
            rows_out.append(dict(shape=name, n=n, k=k, m=m, path=path, err=err, us=t, tbs=tb))
            del x, ref, got
        del w, w_old, dense
        torch.cuda.empty_cache()
    for m in ROWS:
        s = {key: totals[(m, key)] for key in KEYS}
        print(f"layer M={m:<5} bf16 {s['bf16']:8.1f}  old {s['old']:8.1f}  new {s['new']:8.1f}  "
              f"tc {s['tc']:8.1f}  tcgemv {s['tcgemv']:8.1f}  tcdeq {s['tcdeq']:8.1f} us  "
              f"new/bf16 "
              f"{s['new'] / s['bf16']:.2f}  new/old {s['new'] / s['old']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
