"""Launch shapes of ``gemv_fp8_x2`` by exact weight shape (N, K), chosen by measurement
(``benchmarks/kernels/x2_sweep.py`` writes this file; no autotuning at serve time). A value is
(block_n, block_kw, num_warps) for ``_gemv_e4m3_x2_kernel`` or (block_n, block_kw, num_warps,
programs_per_sm, prefetch) for ``_gemv_e4m3_x2_stream_kernel``. Shapes not here take
``gemv_x2_config``'s rules.
"""

X2_TABLE: dict = {}
