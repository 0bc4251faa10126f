"""Dense AWQ / GPTQ int4 (W4A16) GEMMs against bf16 cuBLAS on one GPU: Llama-3.1-8B layer shapes
(qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096) at 1, 4, 16, 128 and
1024 rows, CUDA-graph timed with the L2 flushed before each call (gpu_timing.gtime).

    python3 benchmarks/kernels/bench_int4_dense.py [--sym] [--no-flush] [--json PATH] [--sweep]

Columns (us a call, and effective TB/s: the weight's bytes, codes + scales (+ offsets) for int4,
read once, over the time): ``bf16`` F.linear on the dense bf16 weight; ``old`` the int4 path
as it was before session 19 (one load per code, in the tiled GEMM below 512 rows, in the
dequantize kernel then cuBLAS from 512 rows; its kernels are copied here); ``new``
TritonQuantOps.int4_mm as it is (``path``: gemv / tiled / deq); then the new tiled GEMM and
the new dequantize-then-cuBLAS at every row count, to place ``INT4_GEMV_MAX_M`` and
``DEQUANT_MIN_M``. ``err``: the new path's largest error over the largest output, against
x @ dequantized weight in float32. Groups of 128, asymmetric (AWQ: offsets) unless --sym.
``--sweep`` (instead of the table): the GEMV at 1 and 4 rows over word rows a step (BKW) and
``PROGRAMS_PER_SM`` (the split-K target), one line a shape and row count: the default's time
and the best setting's, to tune ``gemv_int4.gemv_int4_config``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_timing import gtime  # noqa: E402

from tessellm.kernels.gemm import gemv_int4 as gi  # noqa: E402
from tessellm.kernels.gemm import quant_ops  # noqa: E402
from tessellm.kernels.gemm import weight_only as wo  # noqa: E402
from tessellm.kernels.gemm.common import (_dot_args, _epilogue, _split_out,  # noqa: E402
                                          _split_stride, _split_sum, _tile_ranges, _tiles)
from tessellm.quantization.packed import Int4Weight, pack_int4, quantize_int4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 4, 16, 128, 1024)


# --- the kernels as they were before session 19 (one load of the packed word per code) ---
@triton.jit
def _old_int4_gemm_kernel(x_ptr, q_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K,
                          stride_xm, stride_qk, stride_sg, stride_og, stride_om, stride_split,
                          GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                          HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr,
                          SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_K: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_k, rm, rn, k_lo, k_hi = _tile_ranges(K, SPLIT_K, BLOCK_M, BLOCK_N, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    x_row = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    for k0 in range(k_lo, k_hi, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        k_ok = rk < k_hi
        x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
        packed = tl.load(q_ptr + (rk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :],
                         mask=k_ok[:, None] & (rn[None, :] < N), other=0)
        codes = (packed >> ((rk % 8) * 4)[:, None]) & 0xF
        if DOT_FP32:
            x = x.to(tl.float32)
        part = tl.dot(x, (codes - ZERO_POINT).to(x.dtype), input_precision=DOT_PREC)
        g = k0 // GROUP_SIZE
        s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += part * s[None, :]
        if HAS_OFFSETS:
            off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += tl.sum(x.to(tl.float32), axis=1)[:, None] * off[None, :]
    _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k, HAS_BIAS)


@triton.jit
def _old_int4_dequant_kernel(q_ptr, s_ptr, o_ptr, out_ptr, K, N, stride_qk, stride_sg,
                             stride_og, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                             HAS_OFFSETS: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    rk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    ok = (rk[:, None] < K) & (rn[None, :] < N)
    packed = tl.load(q_ptr + (rk // 8)[:, None].to(tl.int64) * stride_qk + rn[None, :], mask=ok,
                     other=0)
    w = (((packed >> ((rk % 8) * 4)[:, None]) & 0xF) - ZERO_POINT).to(tl.float32)
    g = (rk // GROUP_SIZE)[:, None]
    w *= tl.load(s_ptr + g * stride_sg + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    if HAS_OFFSETS:
        w += tl.load(o_ptr + g * stride_og + rn[None, :], mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + rn[None, :].to(tl.int64) * K + rk[:, None],
             w.to(out_ptr.dtype.element_ty), mask=ok)


def old_int4_mm(x, w: Int4Weight):
    m, k = x.shape
    n = w.qweight.shape[1]
    offsets = w.offsets if w.offsets is not None else w.scales
    if m >= wo.DEQUANT_MIN_M:
        dense = torch.empty(n, k, dtype=x.dtype, device=x.device)
        _old_int4_dequant_kernel[(triton.cdiv(k, 64), triton.cdiv(n, 64))](
            w.qweight, w.scales, offsets, dense, k, n, w.qweight.stride(0), w.scales.stride(0),
            offsets.stride(0), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
            HAS_OFFSETS=w.offsets is not None, BLOCK_K=64, BLOCK_N=64)
        return F.linear(x, dense)
    t = _tiles(x, m, n, k, w.group_size)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    _old_int4_gemm_kernel[grid](
        x, w.qweight, w.scales, offsets, x, out, m, n, k, x.stride(0), w.qweight.stride(0),
        w.scales.stride(0), offsets.stride(0), out.stride(-2), _split_stride(out),
        GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point, HAS_OFFSETS=w.offsets is not None,
        HAS_BIAS=False, **_dot_args(x), **t)
    return _split_sum(out, x.dtype)


def _weight(n, k, sym):
    w = torch.randn(n, k, device="cuda") * 0.02
    q, s, z = quantize_int4(w, 128, symmetric=sym)
    if sym:
        return Int4Weight(pack_int4(q), s.half(), None, 8, 128)
    return Int4Weight(pack_int4(q), s.half(), -(z.float() * s.float()), 0, 128)


def sweep(flush: bool, sym: bool) -> None:
    print(f"{torch.cuda.get_device_name()} | GEMV sweep, us (L2 {'flushed' if flush else 'warm'})",
          flush=True)
    config = gi.gemv_int4_config
    for name, (n, k) in SHAPES.items():
        w = _weight(n, k, sym)
        for m in (1, 4):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            base = gtime(lambda: gi.gemv_int4(x, w), flush=flush)
            best = (base, "default")
            for bkw in (16, 32, 64):
                for pps in (4, 8, 16):
                    def cfg(*a, bkw=bkw, pps=pps, **kw):
                        old, gi.PROGRAMS_PER_SM = gi.PROGRAMS_PER_SM, pps
                        try:
                            t = config(*a, **kw)
                        finally:
                            gi.PROGRAMS_PER_SM = old
                        kwd = k // 8
                        steps = triton.cdiv(kwd, bkw)
                        split = t["SPLIT_K"]
                        while split > 1 and steps // split < 2:
                            split //= 2
                        return dict(t, BKW=bkw, SPLIT_K=split, grid=(t["grid"][0], split),
                                    EVEN_K=kwd % bkw == 0 and steps % split == 0)
                    gi.gemv_int4_config = cfg
                    try:
                        us = gtime(lambda: gi.gemv_int4(x, w), flush=flush)
                    except Exception as e:  # noqa: BLE001 (a setting that fails: skip it)
                        print(f"sweep {name} M={m} BKW={bkw} pps={pps}: {type(e).__name__}")
                        us = float("inf")
                    finally:
                        gi.gemv_int4_config = config
                    if us < best[0]:
                        best = (us, f"BKW={bkw} PROGRAMS_PER_SM={pps}")
            print(f"sweep {name:8} M={m}: default {base:7.1f} us, best {best[0]:7.1f} us "
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
    rows_out = []
    print(f"{torch.cuda.get_device_name()} | groups of 128, {'sym' if args.sym else 'asym'}, "
          f"L2 {'flushed' if flush else 'warm'} | us (TB/s)", flush=True)
    print(f"{'shape':8}{'M':>5} {'bf16':>14} {'old':>14} {'new':>14} {'path':>6} "
          f"{'tiled':>8} {'deq+cuBLAS':>10} {'new/old':>8} {'err':>8}", flush=True)
    totals: dict = {}
    for name, (n, k) in SHAPES.items():
        w = _weight(n, k, args.sym)
        dense = w.dequantize(torch.bfloat16).cuda()
        wbytes = w.qweight.nbytes + w.scales.nbytes + (w.offsets.nbytes if w.offsets is not None
                                                       else 0)
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            path = ("gemv" if m <= gi.INT4_GEMV_MAX_M else
                    "deq" if m >= ops.dequant_min_m else "tiled")
            ref = x.float() @ dense.float().t()
            got = ops.int4_mm(x, w).float()
            err = ((got - ref).abs().max() / ref.abs().max()).item()
            t = dict(bf16=gtime(lambda: F.linear(x, dense), flush=flush),
                     old=gtime(lambda: old_int4_mm(x, w), flush=flush),
                     new=gtime(lambda: ops.int4_mm(x, w), flush=flush),
                     tiled=gtime(lambda: wo.int4_gemm(x, w), flush=flush),
                     deq=gtime(lambda: F.linear(x, wo.int4_dequantize(w, x.dtype)), flush=flush))
            tb = {key: (dense.nbytes if key == "bf16" else wbytes) / (us * 1e-6) / 1e12
                  for key, us in t.items()}
            for key, us in t.items():
                totals[(m, key)] = totals.get((m, key), 0.0) + us
            print(f"{name:8}{m:>5} {t['bf16']:7.1f} ({tb['bf16']:4.2f}) {t['old']:7.1f} "
                  f"({tb['old']:4.2f}) {t['new']:7.1f} ({tb['new']:4.2f}) {path:>6} "
                  f"{t['tiled']:8.1f} {t['deq']:10.1f} {t['old'] / t['new']:7.2f}x "
                  f"{err:8.1e}", flush=True)
            rows_out.append(dict(shape=name, n=n, k=k, m=m, path=path, err=err, us=t, tbs=tb))
            del x, ref, got
        del w, dense
        torch.cuda.empty_cache()
    for m in ROWS:
        s = {key: totals[(m, key)] for key in ("bf16", "old", "new", "tiled", "deq")}
        print(f"layer M={m:<5} bf16 {s['bf16']:8.1f}  old {s['old']:8.1f}  new {s['new']:8.1f}  "
              f"tiled {s['tiled']:8.1f}  deq {s['deq']:8.1f} us  new/bf16 "
              f"{s['new'] / s['bf16']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows_out, indent=1))


if __name__ == "__main__":
    main()
