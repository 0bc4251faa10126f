#!/usr/bin/env bash
# KV connectors (--kv-transfer-config, docs/kv_transfer.md) on one GPU, ~5 minutes:
#   1. conformance: swap_blocks through pageable host memory (bf16, fp8) and producer/consumer
#      generation equal to a plain run, on the cuda backend;
#   2. check: tiny Llama on cuda, a producer engine saves block files, a consumer loads them:
#      tokens equal HF's and a plain run's, 40 of 42 prompt tokens loaded;
#   3. ttft: Llama-3.1-8B dummy weights, an 8000-token prompt: recompute (no connector) vs the
#      producer (prefill + saving ~1 GiB of files) vs the consumer (loading them).
# Run from the repository root: bash benchmarks/kvconn_device.sh   (OUT=... for the logs;
# KV_DIR=... for where the files go, default /tmp)
# Expect: conformance 3 passed; "CHECK PASS"; TTFT lines: kv_consumer well under None (a load of
# ~1 GiB from the page cache vs an 8000-token prefill); kv_producer above None by the save.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t conformance ${CONF_S:-150} python3 -m tessellm.testing --backend cuda -q -k "pageable or kv_connector"
t check ${CHECK_S:-90} python3 benchmarks/kvconn_gpu.py check
grep -E "CHECK|kv_" "$OUT/check.txt"
t ttft ${TTFT_S:-240} python3 benchmarks/kvconn_gpu.py ttft ${TTFT_TOKENS:-8000}
grep TTFT "$OUT/ttft.txt"
