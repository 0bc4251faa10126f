#!/usr/bin/env bash
# MTP speculative decoding (docs/speculative_decoding.md, "Multi-token prediction") on one GPU,
# ~3 minutes: tiny DeepSeek-V3 (MLA + MoE), GLM-4.5 and ERNIE 4.5 MoE checkpoints with an MTP layer, float32,
# greedy tokens with MTP (k = 3; verify and MTP draft steps replayed from CUDA graphs) equal to
# those without; every KV block back; a predictable MTP layer gets every draft accepted.
# Run from the repository root: bash benchmarks/mtp_device.sh   (OUT=... for the logs)
# Expect: "rc=0" and "5 passed" (tests/spec_decode/test_mtp.py -m gpu).
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t mtp_gpu ${MTP_S:-400} python3 -m pytest -q -p no:cacheprovider -m gpu tests/spec_decode/test_mtp.py
# What an MTP draft costs (random weights: nothing accepted): GLM-4.5-Air shapes cut to 4 layers
# plus their MTP layer, B1 (512-token prompt, 128 greedy tokens), plain and with MTP (k = 3).
# Expect two JSON lines: b1_ms_per_token of each, and propose_ms / ms_per_draft_step for mtp (one
# draft step is about one MoE layer and the LM head: roughly a quarter of the 4-layer decode step).
t mtp_cost ${MTP_COST_S:-240} python3 benchmarks/spec_decode_draft.py --methods "plain mtp" \
  --target glm-4.5-air-4l --k 3 --output-len 128 --output-json "$OUT/mtp_cost.json"
grep -h '"method"' "$OUT/mtp_cost.txt" | tail -2
