#!/usr/bin/env bash
# Host work of the hybrid models' eager prefill steps on a CUDA GPU (hybhost, session 18): the
# recurrent-state graph tests (a captured decode step computes A = -exp(A_log) inside the graph;
# eager steps keep it, layers/derived.py), the cuda conformance of the Mamba / gated delta ops
# (x and dt as strided rows), then per model the host ms of a cached prompt's eager steps and the
# aten ops per layer (benchmarks/hybrid_host_step.py), and the recurrent prefix TTFT of this
# morning's run (benchmarks/results/h100-2026-12-06-s18/mprefix2: mamba2 step_ms 39.46, 38.19;
# granite4h 69.95, 62.33) for before/after.
# Run from the repository root: bash benchmarks/hybhost_device.sh   (~5 minutes, 8 at most).
# TESTS_S=0 skips the tests; HOST_S=0 the host-step bench; TTFT_S=0 the TTFT.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider"
t graphs ${TESTS_S:-150} $P -m gpu tests/models/test_cuda_recurrent_state_graphs.py
t conformance ${TESTS_S:-90} python3 -m tessellm.testing --backend cuda -q -k "mamba or gated_delta"
t host_step ${HOST_S:-120} python3 benchmarks/hybrid_host_step.py --device cuda --models mamba2 granite4h
t ttft ${TTFT_S:-200} python3 benchmarks/mprefix_ttft.py --models mamba2 granite4h \
  --input-len 3000 --profile "$OUT"
grep -h '^{' "$OUT/host_step.txt"; grep -h '"speedup"' "$OUT/ttft.txt"
# Expect: graphs and conformance all passed; host_step one JSON line per model (ops_per_layer:
# top-level aten ops of B's two compute steps over the layers; CPU, tiny bf16 Mamba2: 274.8 before
# 1d42751, 254.8 after, i.e. 10 fewer a layer and step; on CUDA the mixer's own launches per
# layer and step go 18 -> 8 where torch has a fused rms_norm (fused_rms_norm_per_layer ~2 for
# the two steps), else 12; launches_per_layer: this morning's profile had ~44 for two steps);
# ttft: cache_on.step_ms under this morning's 39.46 / 38.19 (mamba2) and
# 69.95 / 62.33 (granite4h), by ~10 launches a Mamba layer and step (the SSD scan, 98be099,
# launches 5 kernels a layer where the sequential scan launched 1: +4 back).
