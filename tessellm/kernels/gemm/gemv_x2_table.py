"""Launch shapes of the one-row GEMVs by exact weight shape (N, K), chosen by measurement
(``benchmarks/kernels/x2_sweep.py`` writes this file; no autotuning at serve time).

``X2_TABLE`` (``gemv_fp8_x2``, always consulted): a value is (block_n, block_kw, num_warps) for
``_gemv_e4m3_x2_kernel`` (K split by its rule) or (block_n, block_kw, num_warps,
programs_per_sm, prefetch) for ``_gemv_e4m3_x2_stream_kernel``. Shapes not here take
``gemv_x2_config``'s rules.

``SPLIT_TABLE`` (``gemv_fp8_x2``) and ``BF16_SPLIT_TABLE`` (``gemv``'s FMA kernel at one 16-bit
row), consulted first and only under ``TESSELLM_GEMV_SPLIT_LAST=1``: (block_n, block_kw or
block_k, num_warps, split), K split ``split`` ways, the partial sums combined by each tile's
last program (``split_last.py``). Entries the sweep did not find faster than the tables'
old launch by ``MIN_GAIN`` are dropped, so those shapes keep the old launch under the flag too.
``PREWAIT_TILES`` (``gemv_fp8_x2``, under the same flag): weight tiles a program reads before
its PDL wait for that shape, instead of ``TESSELLM_GEMV_PREWAIT``'s count; the sweep keeps it
as it finds it (it times the GEMV after a norm, not after the attention, o's predecessor).

NVIDIA H200, 2026-12-04 (``benchmarks/results/h200-2026-12-04-b1f/x2_sweep.json``, 46 launch
shapes on each Llama-3.1-8B layer shape): no launch shape beat the rules by 3% (the timing
spread of one shape timed twice is 2.2%), so ``X2_TABLE`` is empty there; the best, within the
spread: o (8, 512, 8, 8, False) 6.16 us against 6.28, qkv and gate_up the rules' own tiles.
``SPLIT_TABLE`` / ``BF16_SPLIT_TABLE``: not yet measured (2026-12-06, gemv8): the qkv and o
shapes of Llama-3.1-8B at a guess, every program one K step of 2 rows (fp8: 2 KB a row; bf16:
1024 values), so the tile it loads before its PDL wait is all of its weights. ``PREWAIT_TILES``:
a guess too: o reads two tiles before its wait (its programs, resident while the ~5 us
attention kernels run, then read ~15 MB of its 16.8 before the wait instead of ~8.6; "2" for
every GEMV lost 4% of the chain on an H100, session 18, where the large GEMVs lost programs an
SM to the registers).
"""

X2_TABLE: dict = {
}

SPLIT_TABLE: dict = {
    (4096, 4096): (2, 512, 4, 2),
    (6144, 4096): (2, 512, 4, 2),
}

PREWAIT_TILES: dict = {
    (4096, 4096): 2,
}

BF16_SPLIT_TABLE: dict = {
    (4096, 4096): (2, 1024, 4, 4),
    (6144, 4096): (2, 1024, 4, 4),
}
