#!/usr/bin/env bash
# The review's GPU checks (~1 min): pinned host memory given back to the OS after an engine
# with the host KV tier shuts down (worker.release -> _empty_host_cache:
# torch.accelerator.empty_host_cache on torch 2.12+, torch._C._host_emptyCache before).
#   bash benchmarks/review_device.sh   (repo root; carry .whl and tessellm.egg-info)
# Expect: review_pinned rc=0 and "1 passed".
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  python3 -c "import torch; print('torch', torch.__version__, 'accelerator.empty_host_cache',
    hasattr(torch.accelerator, 'empty_host_cache'), '_C._host_emptyCache',
    hasattr(torch._C, '_host_emptyCache'))"
  t review_pinned ${REVIEW_S:-90} python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/core/test_kv_offload.py -k pinned_host_tier
} 2>&1 | tee "$OUT/review_log.txt"
