#!/usr/bin/env bash
# AWQ / GPTQ int4 MoE experts (docs/quantization.md, "int4 MoE experts") on one GPU, ~6 minutes (8.5 at most: the limits below sum to 500 s):
# the conformance suite's MoE cases on cuda (test_fused_moe_int4_experts among them), the
# Triton int4 fused MoE against the reference (the tensor-core path and the large-batch
# dequantized path, tests/kernels/test_moe_int4_tc.py, test_moe_int4_dequant.py) and a tiny AWQ
# Qwen3-MoE served on cuda (float32, greedy tokens equal HF's on the dequantized checkpoint),
# then one Qwen3-30B-A3B MoE layer: the engine's int4 dispatch vs bf16 fused MoE at 1, 16, 256,
# 1024, 2048, 4096 tokens, CUDA-graph timed (L2 kept, then flushed), and with L2 flushed the
# tensor-core vs dequantized crossover and the tensor-core path's alignment-block sweep.
# Run from the repository root: bash benchmarks/moeint4_device.sh   (OUT=... for the logs)
# Expect: "rc=0" five times, "passed" and no "failed"; the bench prints one line per token
# count (bf16 us, int4 us, their ratio, the int4 path taken) and the int4 error vs the reference
# (bf16: a few 1e-2 of the largest output at most); the flushed run then "dequant w13 x64 tile
# (rows, words, warps): us GB/s" lines (the dequantization alone, to pick
# int4_dequant.DEQUANT_TILE: near the HBM's ~3,000 GB/s is the goal), "crossover tokens N: tc ..
# deq .." lines and "crossover: dequantize from N tokens" (the value for int4_dequant.py's
# MOE_INT4_DEQUANT_TOKENS), "sweep tokens N: best ..." lines (int4_tc_moe.moe_int4_tc_block_m).
# JSON in $OUT/moeint4_bench.json and moeint4_bench_flush.json.
source benchmarks/device_env.sh
export TESSELLM_MOE_INT4_DEQUANT_TOKENS=${TESSELLM_MOE_INT4_DEQUANT_TOKENS:-1536}  # opt-in in the engine until this run
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t moeint4_conformance ${MOEINT4_CONF_S:-90} python3 -m tessellm.testing --backend cuda -q -k moe
t moeint4_tests ${MOEINT4_TEST_S:-100} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_moe_int4.py -k "triton or cuda_backend"
t moeint4_kernel_tests ${MOEINT4_KTEST_S:-120} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_moe_int4_tc.py tests/kernels/test_moe_int4_dequant.py
t moeint4_bench ${MOEINT4_BENCH_S:-60} python3 benchmarks/kernels/bench_moe_int4.py \
  --json "$OUT/moeint4_bench.json"
grep -h "tokens\|dequant" "$OUT/moeint4_bench.txt"
t moeint4_bench_flush ${MOEINT4_SWEEP_S:-130} python3 benchmarks/kernels/bench_moe_int4.py \
  --flush --crossover --sweep --json "$OUT/moeint4_bench_flush.json"
grep -h "tokens\|dequant" "$OUT/moeint4_bench_flush.txt"
