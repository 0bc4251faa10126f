#!/usr/bin/env bash
# Dense AWQ / GPTQ int4 (W4A16) through the tensor-core GEMM on the load-time tc layout
# (kernels/gemm/int4_tc.py, TESSELLM_INT4_TC, default on) on one GPU, ~6 minutes (8 at most):
#   int4tc_kernels      tests/kernels/test_int4_tc.py (row tiers 5..600, split-K, tc dequantize,
#                       the tc GEMV at 1/2/4 rows)
#                       + tests/kernels/test_gemv_int4.py (the GEMV and the old tiled GEMM)
#   int4tc_conformance  the quant conformance cases on cuda (awq / gptq at 1 and 5 rows; K 256
#                       at 1/4/5/17/40 rows, each row count against the one-row product)
#   int4tc_quant        tests/quantization/test_kernels.py int4 cases, test_loading's AWQ /
#                       GPTQ / act-order checkpoints' logits on cuda
#   int4tc_bench        Llama-3.1-8B layer shapes at 1/4/16/64/256/1024 rows, L2 flushed:
#                       bf16 cuBLAS vs old int4 (TESSELLM_INT4_TC=0 path) vs new, us a product
#   int4tc_sweep        int4_tc_gemm's launch settings at 16/64/256 rows (o, gate_up, down)
#   int4tc_moe_*        MoE: tests, a Qwen3-30B-A3B layer with the tc kernel off / on, settings
# Run from the repository root: bash benchmarks/int4tc_device.sh   (OUT=... for the logs)
# Expect: "rc=0" nine times, "passed" and no "failed" (int4tc_kernels: ~70 passed, 0 skipped);
# the table: one line a shape and row count, err ~1e-2 or below. Since c508ae4 (the lead, from
# the first H100 run) the default holds the tc codes only: path tcgv at 1 row, tc at 4-64,
# deq at 256-1024 (INT4_TC_DEQUANT_MIN_M 160). The next run must check: (1) the kernel tests
# pass with that default (the tc GEMM at 2-4 rows, the 33-64-row tier at BLOCK_N 128);
# (2) "layer M=1" new ~105 us (was gemv_int4 107), "layer M=4" new ~130 (was 171), M=16 ~134,
# M=64 ~200-233 (BLOCK_N 128 now), M=256 new ~452 (deq; tc 583) -- if tcgemv's lead at 1 row
# is gone (down: 27.9 vs 26.5 last time) or tc at 4 rows slower than gemv_int4, set
# TESSELLM_INT4_TC_GEMV=0 and say so; tc vs tcdeq at 128 and 192 rows would place the
# threshold more exactly (only 64 and 256 are in ROWS); (3) the sweep lines: "default" at 64
# rows now the old best (o ~22.7, gate_up ~84, down ~48 us); (4) MoE tc on/off at 16/64/256
# tokens near 0.69-0.98x bf16 with the new tiles (BLOCK_N 128, 4 warps up to 64 pairs), and the
# MoE sweep's "default" equal to its best (256 tokens: stages 2 gave 372 us, the tiles use 3).
# Then the MoE part (below). Every step's limit sums to 8 minutes; each is an env var
# (INT4TC_*_S, 0 skips it); a step cut at its limit keeps the lines it printed.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t int4tc_kernels ${INT4TC_TEST_S:-100} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_int4_tc.py tests/kernels/test_gemv_int4.py
t int4tc_conformance ${INT4TC_CONF_S:-35} python3 -m tessellm.testing --backend cuda -q \
  -k "declared_schemes or int4_layer_at_every"
t int4tc_quant ${INT4TC_QTEST_S:-60} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_kernels.py tests/quantization/test_loading.py \
  -k "int4 or dequantize or other_dtypes or test_int4_checkpoint"
t int4tc_bench ${INT4TC_BENCH_S:-90} python3 benchmarks/kernels/bench_int4_tc.py \
  --json "$OUT/int4tc_bench.json"
grep -v -i warn "$OUT/int4tc_bench.txt" | tail -32
t int4tc_sweep ${INT4TC_SWEEP_S:-55} python3 benchmarks/kernels/bench_int4_tc.py --sweep
grep -h "^sweep" "$OUT/int4tc_sweep.txt"
# MoE: the int4 grouped GEMMs through the tensor-core kernel (kernels/moe/int4_tc_moe.py,
# TESSELLM_MOE_INT4_TC, default on) on one Qwen3-30B-A3B layer (128 experts, top 8, 2048 ->
# 768, groups of 128, zero codes), L2 flushed: tests, then the layer with the kernel off (the
# dequantized-tile kernel, as before) and on at 16 / 64 / 256 tokens, then its settings.
# Expect: "tokens N: bf16 .. int4 .. (int4/bf16 r)" three lines per run; session 19 had int4
# 336 us against bf16 293 at 16 tokens (1.15x); hoped for: "on" well under "off" and under bf16.
t int4tc_moe_tests ${INT4TC_MOE_TEST_S:-55} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_moe_int4_tc.py tests/quantization/test_moe_int4.py -k "tc or triton"
t int4tc_moe_off ${INT4TC_MOE_S:-35} env TESSELLM_MOE_INT4_TC=0 python3 \
  benchmarks/kernels/bench_moe_int4.py --flush --tokens 16 64 256
grep -h "tokens" "$OUT/int4tc_moe_off.txt"
t int4tc_moe_on ${INT4TC_MOE_S:-35} env TESSELLM_MOE_INT4_TC=1 python3 \
  benchmarks/kernels/bench_moe_int4.py --flush --tokens 16 64 256
grep -h "tokens" "$OUT/int4tc_moe_on.txt"
t int4tc_moe_sweep ${INT4TC_MOE_SWEEP_S:-40} python3 benchmarks/kernels/bench_moe_int4.py \
  --flush --tc-sweep --tokens 16 64 256
grep -h "^tcsweep" "$OUT/int4tc_moe_sweep.txt"
