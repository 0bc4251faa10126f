#!/usr/bin/env bash
# Issue 22 (GPU), the fp8 activation fold (TESSELLM_FP8_ACT_FOLD=1: the W8A8 path's per-token
# fp8 quantisation done by the RMSNorm / SiLU-and-mul kernels that produce each GEMM's input,
# instead of _fp8_quant_rows_kernel before qkv, gate_up and down), in one device call:
#   1. the GPU kernel tests of the fold (bitwise the unfused pair at model sizes) and the fp8
#      GEMM tests (TEST_S 90)
#   2. a batch-256 fp8 + fp8-KV decode step's kernels, fold off then on (PROF_S 60 each)
#   3. F fp8 (256 x 512 in / 256 out, fp8 weights + fp8 KV), off then on, F_REPS times (default
#      1: the whole call then fits 10 minutes; F8_S 80 each)
#   4. B1 fp8, off then on: its TTFT is the 512-token fp8 prefill, which the fold reaches
#      (M = 512 > 32); decode at one row is W8A16 and unchanged (B1_S 50 each)
# Time boxes in seconds (env; 0 skips a step). A cold machine compiles in its first runs: run it
# warm (after benchmarks/final.sh PART=1) or raise the boxes. Results in $OUT: log.txt,
# tests.txt, step_fp8{,_fold}.json, f_fp8_{off,on}N.json, b1_fp8{,_fold}.json.
#   bash benchmarks/fp8fold_device.sh        (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8"
LAT="latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3 --quantization fp8"
PROF="python3 benchmarks/profile_step.py --batch 256 --quantization fp8 --kv-cache-dtype fp8"
ON="env TESSELLM_FP8_ACT_FOLD=1"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}"; date -u
  echo "=== gpu tests (limit ${TEST_S:-90} s) $(date -u +%T)"
  timeout ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fp8_fold.py \
    tests/quantization/test_kernels.py -k "fp8 or fold" > "$OUT/tests.txt" 2>&1
  grep -E "passed|failed|error" "$OUT/tests.txt" | tail -8
  TAIL=14 box "step fp8" ${PROF_S:-60} $PROF --output-json "$OUT/step_fp8.json"
  TAIL=14 box "step fp8 act fold" ${PROF_S:-60} $ON $PROF --output-json "$OUT/step_fp8_fold.json"
  for i in $(seq ${F_REPS:-1}); do
    box "F fp8 off $i" ${F8_S:-80} $B $F --output-json "$OUT/f_fp8_off$i.json"
    box "F fp8 act fold $i" ${F8_S:-80} $ON $B $F --output-json "$OUT/f_fp8_on$i.json"
  done
  box "B1 fp8" ${B1_S:-50} $B $LAT --output-json "$OUT/b1_fp8.json"
  box "B1 fp8 act fold" ${B1_S:-50} $ON $B $LAT --output-json "$OUT/b1_fp8_fold.json"
  for f in "$OUT"/f_fp8_o*.json; do
    [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$f"
  done
  for f in b1_fp8 b1_fp8_fold; do
    [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'TTFT ms', d['ttft_ms_median'], 'ms/token', d['tpot_ms_median'])" "$OUT/$f.json" $f
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
