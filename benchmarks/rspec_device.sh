#!/usr/bin/env bash
# Speculative decoding on the recurrent-state models on a CUDA GPU (core/mamba_state.py: spare
# slots per verified token, backends/reference/recurrent_verify.py composed from the Triton
# one-token kernels): greedy equality with n-gram and Qwen3-Next MTP drafts, eager and with
# decode graphs; and the verify ops' conformance on the real cuda backend.
# Run from the repository root: bash benchmarks/rspec_device.sh   (~4 minutes, 8 at most; $OUT gets the logs)
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider -m gpu"
t rspec_cuda 300 $P tests/spec_decode/test_cuda_recurrent_spec.py
t rspec_conformance 120 python3 -m tessellm.testing --backend cuda -q -k "recurrent_verify or mamba or gated_delta"
# Expect: rspec_cuda 5 passed; rspec_conformance all passed (no skips for cuda: it declares both
# supports_mamba2 and supports_gated_delta).
