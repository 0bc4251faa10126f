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
