#!/usr/bin/env bash
# The host KV tier (--kv-offloading-size, docs/kv_offload.md) on one GPU, ~5 minutes:
#   1. conformance: swap_blocks round trips (float32, bf16, fp8) and generation with the tier
#      equal to without, on the cuda backend (pinned host buffers, non_blocking copies);
#   2. check: tiny Llama on cuda, an evicted prompt comes back from the tier: tokens equal HF's;
#   3. bandwidth: the reference swap_blocks on Llama-3.1-8B's cache shape, GB/s each way;
#   4. ttft: Llama-3.1-8B dummy weights, an 8000-token prompt evicted then asked again: its
#      latency loaded from the tier vs recomputed.
# Run from the repository root: bash benchmarks/kvoffload_device.sh   (OUT=... for the logs)
# Expect: conformance 6 passed; "CHECK PASS"; BANDWIDTH lines ~20+ GB/s (pinned, PCIe 5 / H100)
# queued by the host in a few ms (not ~100: no host sync);
# TTFT "P again" with the tier well under its recompute time without it.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t conformance ${CONF_S:-150} python3 -m tessellm.testing --backend cuda -q -k "swap_blocks or host_tier"
t check ${CHECK_S:-90} python3 benchmarks/kvoffload_gpu.py check
grep -E "CHECK|kv_offloading_size" "$OUT/check.txt"
t bandwidth ${BW_S:-60} python3 benchmarks/kvoffload_gpu.py bandwidth
grep BANDWIDTH "$OUT/bandwidth.txt"
t ttft ${TTFT_S:-150} python3 benchmarks/kvoffload_gpu.py ttft ${TTFT_TOKENS:-8000}
grep TTFT "$OUT/ttft.txt"
