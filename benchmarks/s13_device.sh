#!/usr/bin/env bash
# Issue 22 (GPU), session 13's first device call: the fp8 act fold's GPU tests (kernel tests and
# the engine-level cuda test that decides the fold's default), then, by card:
#   H200: final.sh PART=1 (the card's first figures; calls 2 and 3 run PART=2 and 3)
#   other: F's warm per-step split bf16 and fp8 + fold (profile_timeline.py, TL_S 150 each):
#          where F's time goes against the 2.5x goal
#   bash benchmarks/s13_device.sh          (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)
{
  echo "$GPU"; echo "commit ${COMMIT:-unknown}"; date -u
  echo "=== fold gpu tests (limit ${TEST_S:-200} s) $(date -u +%T)"
  timeout ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider -rs tests/kernels/test_fp8_fold.py \
    tests/kernels/test_pairwise_sum.py tests/models/test_fp8_act_fold.py > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|error|FAILED|SKIPPED" "$OUT/tests.txt" | tail -12
} 2>&1 | tee "$OUT/log0.txt"
case "$GPU" in
  *H200*) SKIP_WHL=1 PART=1 bash benchmarks/final.sh ;;
  *)
    TL="python3 benchmarks/profile_timeline.py"
    {
      TAIL=20 box "timeline F bf16" ${TL_S:-150} $TL --output-json "$OUT/tl_bf16.json"
      TAIL=20 box "timeline F fp8 act fold" ${TL_S:-150} env TESSELLM_FP8_ACT_FOLD=1 $TL --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/tl_fp8_fold.json"
    } 2>&1 | tee "$OUT/log1.txt" ;;
esac
