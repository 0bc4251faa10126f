"""Compile the dense int4 (W4A16) Triton kernels for sm90 without a GPU and print shared memory,
layout conversions and ptxas' registers and spills (``aot_moe_int4.compile_report``).

    python3 benchmarks/kernels/aot_int4_dense.py

Shapes as the engine launches them on an H100 / H200: bf16 x, float16 scales, groups of 128;
the GEMV at 1 and 4 rows, symmetric (zero point 8) and with offsets; the tiled GEMM at its
decode (16x64x128), mid (64x64x64) and large (128x128x64) tiles; the dequantize kernel.
Session 19 (CPU, Triton 3.9): GEMV 66-72 registers at 1 row (BKW 32), 124-153 at 4 (BKW 16),
tiled 125-128 (246 at 128x128x64), dequantize 32; no spills anywhere. The GEMV's first form,
a ``[BKW, 8, BLOCK_N]`` tile with x loaded ``[BKW, 8, 1]``, took 254 registers at one row and
spilled 1.7-12 KB at four (Triton laid the 8 nibbles across threads).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aot_moe_int4 import compile_report  # noqa: E402

from tessellm.kernels.gemm import gemv_int4, weight_only  # noqa: E402


def main() -> None:
    common = dict(x_ptr="*bf16", q_ptr="*i32", s_ptr="*fp16", o_ptr="*fp32", bias_ptr="*bf16",
                  stride_xm="i32", stride_qk="i32", stride_sg="i32", stride_og="i32",
                  stride_om="i32", stride_split="i32")
    gemv_types = dict(common, out_ptr="*fp32", N="i32", KW="i32", SPLIT_K="i32")
    for rows in (1, 4):
        for offsets in (False, True):
            compile_report(f"gemv rows={rows} offsets={offsets}", gemv_int4._gemv_int4_kernel,
                           gemv_types, dict(GROUP_SIZE=128, ZERO_POINT=0 if offsets else 8,
                                            HAS_OFFSETS=offsets, HAS_BIAS=False, ROWS=rows,
                                            BLOCK_N=64, BKW=32 if rows == 1 else 16,
                                            EVEN_K=True, EVEN_N=True,
                                            USE_PDL=True), warps=4)
    gemm_types = dict(common, out_ptr="*fp32", M="i32", N="i32", K="i32", SPLIT_K="i32")
    for bm, bn, bk, warps, stages in ((16, 64, 128, 4, 4), (64, 64, 64, 4, 4),
                                      (128, 128, 64, 8, 3)):
        compile_report(f"tiled {bm}x{bn}x{bk}", weight_only._int4_gemm_kernel, gemm_types,
                       dict(GROUP_SIZE=128, ZERO_POINT=8, HAS_OFFSETS=False, HAS_BIAS=False,
                            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, DOT_FP32=False,
                            DOT_PREC="tf32", W16=1), warps=warps, stages=stages)
    deq_types = dict(q_ptr="*i32", s_ptr="*fp16", o_ptr="*fp32", out_ptr="*bf16", K="i32",
                     N="i32", stride_qk="i32", stride_sg="i32", stride_og="i32")
    compile_report("dequantize 64x64", weight_only._int4_dequant_kernel, deq_types,
                   dict(GROUP_SIZE=128, ZERO_POINT=0, HAS_OFFSETS=True, BLOCK_K=64, BLOCK_N=64),
                   warps=4)


if __name__ == "__main__":
    main()
