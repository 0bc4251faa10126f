#!/usr/bin/env bash
# Issue 22 (GPU), wave 2g: the add-RMSNorm folded into the one-row GEMV after it
# (tessellm/kernels/gemm/gemv_norm.py), B1 bf16 before/after, in one device call:
#   1. benchmarks/kernels/decode_chain.py --fold --write-default: the bf16 B1 chain unfused,
#      folded at several launch shapes, without norms, GEMVs alone; the fastest fold shape (by
#      >= 0.5%) becomes NORM_GEMV_CONFIG in this tree (skipped with CHAIN_S=0)
#   2. engine B1 bf16 (bench latency, dummy weights), this tree then the baseline tree OLD
#      (FP8=1: fp8 B1 too). The engine does not use the fold (measured slower, benchmarks/
#      README.md "wave 2g, b1norm"); the 2026-12-04 calls ran a tree where it was wired in.
#   3. GPU tests: tests/kernels/test_gemv_norm.py (the fold at Llama-8B shapes against the
#      float64 oracle and the unfused ops), the cuda conformance of the fused ops,
#      tests/models/test_cuda_parity.py (fp32 greedy = HF)
# Run from this tree's root:  OLD=/path/to/baseline WHL=/path/to/wheels bash benchmarks/b1g_device.sh
# Time boxes (s): CHAIN_S 120, B1_S 60 (each run), TEST_S 150 (each pytest run; 0: none).
# Results (8 files at most, as the device tool returns): $OUT/log.txt, tests.txt, chain.json,
# b1{,_fp8}_{new,old}.json, gemv_norm.py.txt (with the launch shape the chain chose).
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
  if [ "${CHAIN_S:-120}" != 0 ]; then
    TAIL=4 box "chain (fold)" ${CHAIN_S:-120} "$NEW" python3 benchmarks/kernels/decode_chain.py \
      --out "$OUT" --sections chain --fold --write-default
    cp tessellm/kernels/gemm/gemv_norm.py "$OUT/gemv_norm.py.txt"
    grep -n "^NORM_GEMV_CONFIG" tessellm/kernels/gemm/gemv_norm.py
  fi
  for tag in new old; do
    dir=$NEW; [ $tag = old ] && dir=$OLD
    [ -z "$dir" ] && continue
    TAIL=2 box "B1 bf16 ($tag)" ${B1_S:-60} "$dir" $LAT --output-json "$OUT/b1_$tag.json"
    if [ "${FP8:-0}" = 1 ]; then
      TAIL=2 box "B1 fp8 ($tag)" ${B1_S:-60} "$dir" $LAT --quantization fp8 \
        --output-json "$OUT/b1_fp8_$tag.json"
    fi
  done
  show "$OUT"/b1_*.json
  [ "${TEST_S:-150}" = 0 ] && exit 0
  echo "=== gpu tests (limit ${TEST_S:-150} s) $(date -u +%T)"
  T="timeout ${TEST_S:-150} python3 -m pytest -q -p no:cacheprovider"
  (export PYTHONPATH=/tmp/site:$NEW
   $T tests/kernels/test_gemv_norm.py 2>&1
   timeout 60 python3 -m tessellm.testing --backend cuda -q -k "fused_ops" 2>&1
   $T tests/models/test_cuda_parity.py 2>&1) > "$OUT/tests.txt"
  grep -E "passed|failed|error" "$OUT/tests.txt" | tail -8
  date -u
} 2>&1 | tee "$OUT/log.txt"
