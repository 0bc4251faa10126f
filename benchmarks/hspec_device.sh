#!/usr/bin/env bash
# The hybrid recurrent models on a CUDA GPU: prefix caching with speculative decoding (state
# snapshots from the verify steps' per-token states at the block boundaries the accepted tokens
# cross, core/state_prefix.py) with n-gram drafts (decode graphs beside eager verify steps) and
# an EAGLE-3 head (aux hidden states of Mamba and attention layers), with and without async
# scheduling: HF's greedy tokens and the expected prefix hits.
# Run from the repository root: bash benchmarks/hspec_device.sh   (~3 minutes, 6 at most; $OUT gets the logs)
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t hspec_cuda 360 python3 -m pytest -q -p no:cacheprovider -m gpu tests/spec_decode/test_recurrent_spec_prefix.py
# Expect: hspec_cuda 6 passed (mamba2 n-gram, granite4h n-gram, granite4h EAGLE-3, each sync and
# async: HF's tokens, hits of 0, 16 and 36 tokens).
