#!/usr/bin/env bash
# fp8 on the hybrid recurrent-state models (docs/state_space.md, "Quantization") on one GPU,
# ~3 minutes: the cuda backend's fp8 GEMMs (per-channel and block-wise, Triton / scaled_mm) at
# the hybrid layers' shapes (Qwen3-Next-80B's DeltaNet in_proj_qkvz / out_proj, Granite 4.0-H
# small's Mamba in_proj / out_proj) against the W8A8 oracle and the dequantized product; then
# tiny Granite 4.0-H (quantization="fp8", fp8 experts) and a block-fp8 Qwen3-Next checkpoint
# served on cuda in bfloat16, their greedy continuations checked against the dense models'.
# Run from the repository root: bash benchmarks/hybq_device.sh   (OUT=... for the logs)
# Expect: "rc=0" and "5 passed" (tests/quantization/test_hybrid_fp8.py -m gpu); the greedy
# test prints each model's top-1 agreement (-s) in $OUT/hybq_gpu.txt.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t hybq_gpu ${HYBQ_S:-420} python3 -m pytest -q -s -p no:cacheprovider -m gpu \
  tests/quantization/test_hybrid_fp8.py
grep -h "top-1 agreement" "$OUT/hybq_gpu.txt" | tail -2
