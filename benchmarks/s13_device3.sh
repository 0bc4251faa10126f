#!/usr/bin/env bash
# Issue 22 (GPU), session 13's third call: the fp8 act fold on by default. The GPU tests that
# touch fp8 (tests/quantization, the fold's kernel and engine tests, cuda parity; TEST_S 300),
# then F fp8 at the new default and with TESSELLM_FP8_ACT_FOLD=0 in one run (F8_S 90 each).
#   bash benchmarks/s13_device3.sh         (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8"
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  echo "=== gpu tests (limit ${TEST_S:-300} s) $(date -u +%T)"
  timeout ${TEST_S:-300} python3 -m pytest -q -p no:cacheprovider -rs -x tests/kernels/test_fp8_fold.py \
    tests/models/test_fp8_act_fold.py tests/models/test_cuda_parity.py tests/quantization > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|error|FAILED" "$OUT/tests.txt" | tail -8
  box "F fp8 (fold default)" ${F8_S:-90} $B $F --output-json "$OUT/f_fp8_default.json"
  box "F fp8 fold off" ${F8_S:-90} env TESSELLM_FP8_ACT_FOLD=0 $B $F --output-json "$OUT/f_fp8_off.json"
  for f in f_fp8_default f_fp8_off; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done
} 2>&1 | tee "$OUT/log.txt"
