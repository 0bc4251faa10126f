#!/usr/bin/env bash
# Issue 22 (GPU), wave 2f: the one-row fp8 GEMV tuned by measurement, and B1 before/after, in
# one device call:
#   1. benchmarks/kernels/x2_sweep.py --write-table: every launch shape of gemv_fp8_x2 on the
#      Llama-3.1-8B layer shapes (GB/s), the winners written to gemv_x2_table.py in this tree,
#      then qkv/o/gate_up/down of 8 layers in one graph, default shapes against the winners
#   2. engine B1 (bench latency, dummy weights) fp8 then bf16, this tree (with the new table)
#      then the baseline tree OLD
#   3. GPU tests: tests/kernels/test_gemv.py (x2 and fp8 cases, the table's entries at their
#      shapes) and tests/models/test_cuda_parity.py
# Run from this tree's root:  OLD=/path/to/baseline WHL=/path/to/wheels bash benchmarks/b1f_device.sh
# Time boxes (s): SWEEP_S 200, B1_S 60 (each run), TEST_S 150. Results (8 files at most, as the
# device tool returns): $OUT/log.txt, x2_sweep.json, gemv_x2_table.py, b1{,_fp8}_{new,old}.json,
# tests.txt.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_ab.sh  # $OUT, the wheels ($WHL), PYTHONPATH, NEW/OLD, box, B
L8=benchmarks/model-configs/llama-3.1-8b
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 5"
show() { for f in "$@"; do [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], {k: d[k] for k in ('ttft_ms_median','tpot_ms_median') if k in d})" "$f"; done; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}, baseline ${OLD_COMMIT:-${OLD:-none}}"; date -u
  TAIL=12 box "x2 sweep" ${SWEEP_S:-200} "$NEW" python3 benchmarks/kernels/x2_sweep.py \
    --out "$OUT" --write-table
  for tag in new old; do
    dir=$NEW; [ $tag = old ] && dir=$OLD
    [ -z "$dir" ] && continue
    TAIL=2 box "B1 fp8 ($tag)" ${B1_S:-60} "$dir" $LAT --quantization fp8 --output-json "$OUT/b1_fp8_$tag.json"
    TAIL=2 box "B1 bf16 ($tag)" ${B1_S:-60} "$dir" $LAT --output-json "$OUT/b1_$tag.json"
  done
  show "$OUT"/b1_*.json
  echo "=== gpu tests (limit ${TEST_S:-150} s) $(date -u +%T)"
  T="timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider"
  (export PYTHONPATH=/tmp/site:$NEW; $T tests/kernels/test_gemv.py -k "x2 or fp8" 2>&1
   $T tests/models/test_cuda_parity.py 2>&1) > "$OUT/tests.txt"
  grep -E "passed|failed|error" "$OUT/tests.txt" | tail -8
  date -u
} 2>&1 | tee "$OUT/log.txt"
