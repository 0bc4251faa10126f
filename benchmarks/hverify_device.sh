#!/usr/bin/env bash
# The fused verify kernels of speculative decoding on the hybrid models (kernels/mamba/verify.py,
# kernels/gated_delta/verify.py: one launch per op over every verify sequence's k + 1 tokens,
# served by the cuda backend's ops) and the hybrids' verify graphs on one GPU, ~5 minutes: the
# kernels against the pure-torch ops (tests/kernels), the verify ops' conformance on the real
# cuda backend (a captured-step batch included), greedy equality of n-gram / MTP speculation on
# tiny Mamba2, Granite 4.0-H and Qwen3-Next models (eager, and with decode + verify graphs; the
# graphs test counts verify-graph replays), and a micro-bench of one layer's verify ops, fused
# against the composed path they replace (Granite 4.0-H small / Qwen3-Next-80B heads, batch
# 1/16/64, k = 3/5, bf16, CUDA-graph-timed and eager).
# Run from the repository root: bash benchmarks/hverify_device.sh   (OUT=... for the logs)
# Expect: hverify_kernels "24 passed"; hverify_conformance all passed (no skips: cuda declares
# supports_mamba2 and supports_gated_delta); hverify_cuda_spec "5 passed"; hverify_graphs
# "2 passed" (a failure "no verify step was replayed": the graphs were not used); hverify_bench
# rc=0 and a table (also $OUT/hverify_bench.txt) with the fused path's speed-up in the "x" columns and
# both paths' largest relative difference per case (each below 5e-2).
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider"
t hverify_kernels 90 $P tests/kernels/test_recurrent_verify_kernels.py
t hverify_conformance 120 python3 -m tessellm.testing --backend cuda -q -k "recurrent_verify or mamba or gated_delta"
t hverify_cuda_spec 240 $P -m gpu tests/spec_decode/test_cuda_recurrent_spec.py
t hverify_graphs 150 $P -m gpu tests/spec_decode/test_recurrent_verify_graphs.py
TAIL_T=40 t hverify_bench 150 python3 benchmarks/kernels/bench_recurrent_verify.py
grep -E "^(model|granite|qwen3)" "$OUT/hverify_bench.txt"
