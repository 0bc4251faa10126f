#!/usr/bin/env bash
# Issue 22 (GPU), session 13's second call (H100 or H200): the engine-level cuda fold test again
# (its first two GPU runs failed in the test's own monkeypatching, not in the fold), a batch-256
# bf16 decode step's host phases, GPU time and kernels (PROF_S 90), F fp8 with the fold off
# and on in one run (F8_S 90 each).   bash benchmarks/s13_device2.sh   (carry .whl, tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8"
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  echo "=== cuda fold test (limit ${TEST_S:-150} s) $(date -u +%T)"
  timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_fp8_act_fold.py > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|error|FAILED" "$OUT/tests.txt" | tail -6
  TAIL=40 box "step bf16 256" ${PROF_S:-90} python3 benchmarks/profile_step.py --batch 256 --output-json "$OUT/step_bf16.json"
  box "F fp8" ${F8_S:-90} $B $F --output-json "$OUT/f_fp8.json"
  box "F fp8 act fold" ${F8_S:-90} env TESSELLM_FP8_ACT_FOLD=1 $B $F --output-json "$OUT/f_fp8_fold.json"
  for f in f_fp8 f_fp8_fold; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done
} 2>&1 | tee "$OUT/log.txt"
