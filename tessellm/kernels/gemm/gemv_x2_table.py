"""Launch shapes of ``gemv_fp8_x2`` by exact weight shape (N, K), chosen by measurement
(``benchmarks/kernels/x2_sweep.py`` writes this file; no autotuning at serve time). A value is
(block_n, block_kw, num_warps) for ``_gemv_e4m3_x2_kernel`` or (block_n, block_kw, num_warps,
programs_per_sm, prefetch) for ``_gemv_e4m3_x2_stream_kernel``. Shapes not here take
``gemv_x2_config``'s rules.

NVIDIA H200, 2026-12-04 (``benchmarks/results/h200-2026-12-04-b1f/x2_sweep.json``, 46 launch
shapes on each Llama-3.1-8B layer shape): no launch shape beat the rules by 3% (the timing
spread of one shape timed twice is 2.2%), so the table is empty there; the best, within the
spread: o (8, 512, 8, 8, False) 6.16 us against 6.28, qkv and gate_up the rules' own tiles.
"""

X2_TABLE: dict = {
}
