#!/usr/bin/env bash
# Session 16's one device call (~9.5 min at the boxes): the GPU fixes of bbf1f52 (block-fp8
# GEMM kernel tests, gpt-oss, the recurrent-state graphs against HF: FIX_S), perf22's decode
# GEMM (tests, sweep, F off/on: perf22_device.sh with P22_* limits), the host KV
# tier's cuda conformance and tiny-model check (KVO_S), MTP's GPU tests (MTP_S).
#   bash benchmarks/s16_device.sh   (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source benchmarks/device_env.sh
export SKIP_WHL=1
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  t fix_kernels ${FIX_S:-40} python3 -m pytest -q -p no:cacheprovider tests/quantization/test_block_fp8.py \
    -k triton_block_gemm tests/models/test_gpt_oss_moe.py
  t fix_graphs ${FIX_S:-60} python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_cuda_recurrent_state_graphs.py
  t kvo_conformance ${KVO_S:-45} python3 -m tessellm.testing --backend cuda -q -k "swap_blocks or host_tier"
  t kvo_check ${KVO_S:-50} python3 benchmarks/kvoffload_gpu.py check
  grep -E "CHECK|kv_offloading_size" "$OUT/kvo_check.txt"
  t mtp_gpu ${MTP_S:-90} python3 -m pytest -q -p no:cacheprovider -m gpu tests/spec_decode/test_mtp.py
} 2>&1 | tee "$OUT/s16_log.txt"
TEST_S=${P22_TEST_S:-50} CONF_S=${P22_CONF_S:-0} BENCH_S=${P22_BENCH_S:-70} STEP_S=${P22_STEP_S:-0} \
  F_S=${P22_F_S:-55} bash benchmarks/perf22_device.sh
