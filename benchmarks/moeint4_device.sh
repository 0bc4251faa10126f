#!/usr/bin/env bash
# AWQ / GPTQ int4 MoE experts (docs/quantization.md, "int4 MoE experts") on one GPU, ~5 minutes (8 at most):
# the conformance suite's MoE cases on cuda (test_fused_moe_int4_experts among them), the
# Triton int4 fused MoE against the reference and a tiny AWQ Qwen3-MoE served on cuda
# (float32, greedy tokens equal HF's on the dequantized checkpoint), then one Qwen3-30B-A3B
# MoE layer: int4 fused MoE vs bf16 fused MoE at 1, 16, 256, 2048 tokens, CUDA-graph timed.
# Run from the repository root: bash benchmarks/moeint4_device.sh   (OUT=... for the logs)
# Expect: "rc=0" four times, "passed" and no "failed"; the bench prints one line per token
# count (bf16 us, int4 us, their ratio) and the int4 error vs the reference (bf16: a few 1e-2 of the largest output at most);
# JSON in $OUT/moeint4_bench.json (and moeint4_bench_flush.json: L2 flushed, plus a sweep of
# int4 tile settings, "sweep tokens N: best ..." lines, to tune kernels/moe/fused_moe.py's tiles).
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t moeint4_conformance ${MOEINT4_CONF_S:-120} python3 -m tessellm.testing --backend cuda -q -k moe
t moeint4_tests ${MOEINT4_TEST_S:-120} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_moe_int4.py -k "triton or cuda_backend"
t moeint4_bench ${MOEINT4_BENCH_S:-90} python3 benchmarks/kernels/bench_moe_int4.py \
  --json "$OUT/moeint4_bench.json"
grep -h "tokens" "$OUT/moeint4_bench.txt"
t moeint4_bench_flush ${MOEINT4_SWEEP_S:-150} python3 benchmarks/kernels/bench_moe_int4.py \
  --flush --sweep --json "$OUT/moeint4_bench_flush.json"
grep -h "tokens" "$OUT/moeint4_bench_flush.txt"
