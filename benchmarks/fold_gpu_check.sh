#!/usr/bin/env bash
# Issue 22 (GPU), the fp8 act fold's fix (14545ad: the norm's sum of squares pairwise by index,
# no FMA; the Triton fp8 GEMM's split-K without atomics), in one device call:
#   1. the fold's GPU kernel tests, bitwise the unfused pair (TEST_S 180; a cold machine compiles)
#   2. the norm kernels alone, after the fix then before it (benchmarks/kernels/norm_bench.py;
#      "before" swaps in the pre-fix norm.py and allreduce_norm.py from $OLD, default
#      .devdata/old_norm: `git show 40e9149:<path>` of each, carried as an ignored path)
#   3. B1 bf16, before then after (B1_S 90 each): the default bf16 path pays the pairwise sum too
# Results in $OUT: log.txt, tests.txt, norm_{after,before}.json, b1_{before,after}.json.
#   bash benchmarks/fold_gpu_check.sh        (repo root; carry .whl, tessellm.egg-info, .devdata)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
OLD=${OLD:-.devdata/old_norm}
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
swap() { cp tessellm/kernels/norm.py /tmp/norm.new; cp tessellm/backends/cuda/allreduce_norm.py /tmp/arn.new
         cp "$OLD/norm.py" tessellm/kernels/norm.py; cp "$OLD/allreduce_norm.py" tessellm/backends/cuda/allreduce_norm.py; }
unswap() { cp /tmp/norm.new tessellm/kernels/norm.py; cp /tmp/arn.new tessellm/backends/cuda/allreduce_norm.py; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}"; date -u
  echo "=== gpu tests (limit ${TEST_S:-180} s) $(date -u +%T)"
  timeout ${TEST_S:-180} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_fold.py \
    tests/kernels/test_pairwise_sum.py tests/models/test_fp8_act_fold.py > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|error|FAILED" "$OUT/tests.txt" | tail -12
  TAIL=40 box "norm kernels after" ${NORM_S:-60} python3 benchmarks/kernels/norm_bench.py --out "$OUT/norm_after.json"
  if [ -f "$OLD/norm.py" ]; then
    swap
    TAIL=40 box "norm kernels before" ${NORM_S:-60} python3 benchmarks/kernels/norm_bench.py --out "$OUT/norm_before.json"
    box "B1 bf16 before" ${B1_S:-90} $LAT --output-json "$OUT/b1_before.json"
    unswap
  fi
  box "B1 bf16 after" ${B1_S:-90} $LAT --output-json "$OUT/b1_after.json"
  for f in b1_before b1_after; do
    [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'TTFT ms', d['ttft_ms_median'], 'ms/token', d['tpot_ms_median'])" "$OUT/$f.json" $f
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
