"""bitsandbytes 4-bit (NF4) GEMMs against bf16 cuBLAS on one GPU: Llama-3.1-8B layer shapes (qkv
4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096) at 1, 2, 4, 8, 16, 128 and 1024
rows, CUDA-graph timed with the L2 flushed before each call (gpu_timing.gtime).

    python3 benchmarks/kernels/bench_bnb4.py [--no-flush] [--json PATH]

Columns (us a call): ``bf16`` F.linear on the dense weight; ``bnb4`` TritonQuantOps.bnb4_mm as
it is (``path``: gemv up to ``bnb4.GEMV_MAX_M`` rows, else dequantize + cuBLAS); then the GEMV
(up to 16 rows; ``bench_bnb4_sweep.py`` sweeps its launch shapes) and dequantize + cuBLAS at
every row count, to place ``GEMV_MAX_M``. ``TB/s``: the codes and
absmaxes (0.5 + 4/64 bytes a weight) read once, over the GEMV's time. ``err``: the path's
largest error over the largest output, against x @ the dequantized weight in float32. The
weights are quantized here with ``bnb.quantize_bnb4`` (NF4, blocks of 64: the format the hub's
``*-bnb-4bit`` checkpoints store; no bitsandbytes package needed).
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

from tessellm.kernels.gemm import bnb4  # noqa: E402
from tessellm.kernels.gemm.quant_ops import TritonQuantOps  # noqa: E402
from tessellm.quantization.bnb import quantize_bnb4  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 2, 4, 8, 16, 128, 1024)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-flush", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    flush = not args.no_flush
    torch.manual_seed(0)
    ops = TritonQuantOps()
    results = []
    print(f"{'layer':8} {'rows':>5} {'bf16':>8} {'bnb4':>8} {'path':>5} {'gemv':>8} {'deq':>8} "
          f"{'TB/s':>6} {'err':>8}")
    for name, (n, k) in SHAPES.items():
        dense = torch.randn(n, k, device="cuda") * 0.02
        w = quantize_bnb4(dense, "nf4").to("cuda")
        wd = w.dequantize(torch.bfloat16)
        wref = w.dequantize(torch.float32)
        code_bytes = n * k // 2 + w.absmax.numel() * 4
        for m in ROWS:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16 = gtime(lambda: F.linear(x, wd), flush=flush)
            t_path = gtime(lambda: ops.bnb4_mm(x, w), flush=flush)
            # the GEMV launches once a GEMV_ROWS rows: timed up to 16 rows (0 above)
            t_gemv = gtime(lambda: bnb4.bnb4_gemv(x, w), flush=flush) if m <= 16 else 0.0
            t_deq = gtime(lambda: F.linear(x, bnb4.bnb4_dequantize(w, x.dtype)), flush=flush)
            want = x.float() @ wref.t()
            err = ((ops.bnb4_mm(x, w).float() - want).abs().max() / want.abs().max()).item()
            path = "gemv" if m <= bnb4.GEMV_MAX_M else "deq"
            tbs = code_bytes / t_gemv / 1e6 if t_gemv else 0.0
            row = dict(layer=name, rows=m, bf16_us=t_bf16, bnb4_us=t_path, path=path,
                       gemv_us=t_gemv, deq_us=t_deq, gemv_tbs=tbs, err=err)
            results.append(row)
            print(f"{name:8} {m:5d} {t_bf16:8.1f} {t_path:8.1f} {path:>5} {t_gemv:8.1f} "
                  f"{t_deq:8.1f} {row['gemv_tbs']:6.2f} {err:8.1e}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "flush": flush,
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
