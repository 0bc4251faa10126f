#!/usr/bin/env bash
# Issue 22 (GPU), wave 2g: the fp8-KV split-KV decode kernel's launch shapes at batch 128-256,
# and F fp8 (fp8 weights + fp8 KV) before/after, in one device call:
#   1. benchmarks/quantization/decode_sweep.py --write-table: BLOCK_N x warps x stages x grid
#      order x splits of _decode_split_kernel (fp8 and bf16 caches, batch 256 and 128,
#      contexts 512-768, L's 1024-2048 for the record), CUDA graphs over 3 cache copies; the fp8
#      winners written to tessellm/kernels/attention/decode_table.py in this tree (KINDS)
#   2. GPU tests of what the table touches (decode launch shapes, fp8 KV, Triton attention)
#   3. F fp8 through `bench throughput`, this tree (with the table) then the baseline OLD
# Run from this tree's root (carry .whl and tessellm.egg-info; OLD: a baseline tree, or OLD_TAR):
#   OLD_TAR=.devdata/old.tar bash benchmarks/f8g_device.sh
# OLD_TAR: `git archive` of the baseline (tessellm/, benchmarks/model-configs, pyproject.toml).
# Time boxes (s): SWEEP_S 170, TEST_S 90, F_S 75 (each run). SWEEP_ARGS: more decode_sweep.py
# arguments; TESTS / TEST_ARGS: the test files / pytest options (e.g. -n 8); F_RUNS: which trees
# run F, in order (default "new old"; empty: none). Results in $OUT: log.txt,
# decode_sweep.json, decode_table.py, tests.txt, f_fp8_{new,old}.json.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_ab.sh  # $OUT, the wheels, PYTHONPATH, NEW/OLD, box, B
if [ -n "${OLD_TAR:-}" ] && [ -f "$OLD_TAR" ]; then
  OLD=/tmp/f8g-old; rm -rf "$OLD"; mkdir -p "$OLD"
  tar -x -C "$OLD" -f "$OLD_TAR" && cp -r tessellm.egg-info "$OLD/" 2>/dev/null
fi
F="throughput --model benchmarks/model-configs/llama-3.1-8b --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}, baseline ${OLD_COMMIT:-${OLD:-none}}"; date -u
  TAIL=40 box "decode sweep" ${SWEEP_S:-170} "$NEW" python3 benchmarks/quantization/decode_sweep.py \
    --warm-procs ${WARM_PROCS:-12} --out "$OUT/decode_sweep.json" --table-kinds ${KINDS:-fp8} \
    --write-table tessellm/kernels/attention/decode_table.py ${SWEEP_ARGS:-}
  cp tessellm/kernels/attention/decode_table.py "$OUT/decode_table.py"
  grep -A6 "^DECODE_TABLE" tessellm/kernels/attention/decode_table.py
  echo "=== gpu tests (limit ${TEST_S:-90} s) $(date -u +%T)"
  (cd "$NEW" && PYTHONPATH=/tmp/site:$NEW timeout ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider \
     ${TEST_ARGS:-} ${TESTS:-tests/kernels/test_decode_launch.py tests/quantization/test_kv_cache_fp8.py \
     tests/kernels/test_triton_attention.py} 2>&1) > "$OUT/tests.txt"
  grep -E "passed|failed|error" "$OUT/tests.txt" | tail -8
  for tag in ${F_RUNS-new old}; do
    dir=$NEW; [ $tag = old ] && dir=$OLD
    [ -z "$dir" ] && continue
    TAIL=3 box "F fp8 ($tag)" ${F_S:-75} "$dir" $B $F --output-json "$OUT/f_fp8_$tag.json"
  done
  for f in "$OUT"/f_fp8_*.json; do
    [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$f"
  done
  date -u
} 2>&1 | tee "$OUT/log.txt"
