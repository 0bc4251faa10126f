"""Compile the bitsandbytes 4-bit decode GEMV (``gemm/bnb4.py``) for sm90 without a GPU and print
shared memory, layout conversions and ptxas' registers and spills per launch shape
(``aot_moe_int4.compile_report``): the default sweep's variants of ``bench_bnb4_sweep.py`` at
1 and 4 rows, bf16 x, NF4 blocks of 64, K whole steps. A variant that spills is not worth its
GPU time.

    python3 benchmarks/kernels/bench_bnb4_aot.py
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from aot_moe_int4 import compile_report  # noqa: E402
from bench_bnb4_sweep import name, variants  # noqa: E402

from tessellm.kernels.gemm import bnb4  # noqa: E402


def main() -> None:
    types = dict(x_ptr="*bf16", q_ptr="*u8", absmax_ptr="*fp32", code_ptr="*fp32",
                 bias_ptr="*bf16", out_ptr="*bf16", y_ptr="*bf16", split_ctr_ptr="*i32",
                 N="i32", K="i32", stride_q="i32", stride_xm="i32", stride_om="i32",
                 stride_split="i32", SPLIT_K="i32")
    seen = set()
    for v in variants(wide=False):
        key = (v["BLOCK_N"], v["BKB"], v["num_warps"], v["num_stages"], v["X_TILE"], v["LUT"],
               v["X_WORDS"], v["WIDE_Q"], v["SPLIT_LAST"])
        if key in seen:
            continue
        seen.add(key)
        for rows in (1, 4):
            t = dict(types, code_ptr="*i64" if v["LUT"] == bnb4.LUTS["pair"] else "*fp32")
            compile_report(f"{name(v)} rows={rows}", bnb4._bnb4_gemv_kernel, t,
                           dict(BS=64, HAS_BIAS=False, ROWS=rows, BLOCK_N=v["BLOCK_N"],
                                BKB=v["BKB"], EVEN_K=True, X_TILE=v["X_TILE"], LUT=v["LUT"],
                                X_WORDS=v["X_WORDS"], WIDE_Q=v["WIDE_Q"],
                                SPLIT_LAST=2 if v["SPLIT_LAST"] else 0),
                           warps=v["num_warps"], stages=v["num_stages"])


if __name__ == "__main__":
    main()
