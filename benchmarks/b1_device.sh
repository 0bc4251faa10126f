#!/usr/bin/env bash
# Issue 22 (GPU), wave 2e: B1 latency, this tree against a baseline tree in one device call.
#   1. GPU tests of the attention kernels changed (split-KV decode, rotary + cache write)
#   2. benchmarks/kernels/decode_chain.py chain (32 Llama-8B layers + LM head, one CUDA graph,
#      PDL): this tree --quick with its attention variants, then the baseline's chain
#   3. engine B1 (bench latency, dummy weights) bf16 and fp8, this tree then the baseline
#   4. workload F (256 x 512 in / 256 out), this tree then the baseline (F_S=0 skips)
# Run from this tree's root:  OLD=/path/to/baseline/tree bash benchmarks/b1_device.sh
# (OLD unset: this tree only). Time boxes (s; 0 skips): TEST_S 120, CHAIN_S 120, OLD_CHAIN_S 90,
# B1_S 60 (each run), F_S 0. Results: $OUT/log.txt, $OUT/chain_{new,old}/chain.json,
# $OUT/{b1,b1_fp8,f}_{new,old}.json (at most 8 files, as the device tool returns).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_ab.sh  # $OUT, the wheels, PYTHONPATH, NEW/OLD, box, B
L8=benchmarks/model-configs/llama-3.1-8b
show() { for f in "$@"; do [ -f "$f" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], {k: d[k] for k in ('ttft_ms_median','tpot_ms_median','output_tokens_per_s','elapsed_s') if k in d})" "$f"; done; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${COMMIT:-unknown}, baseline ${OLD_COMMIT:-${OLD:-none}}"; date -u
  TAIL=8 box "gpu tests" ${TEST_S:-120} "$NEW" python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_decode_latency.py tests/kernels/test_triton_attention.py \
    tests/kernels/test_triton_rotary_cache.py
  box "chain (this tree)" ${CHAIN_S:-120} "$NEW" python3 benchmarks/kernels/decode_chain.py \
    --out "$OUT/chain_new" --sections chain --quick
  [ -n "$OLD" ] && box "chain (baseline)" ${OLD_CHAIN_S:-90} "$OLD" \
    python3 benchmarks/kernels/decode_chain.py --out "$OUT/chain_old" --sections chain
  LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
  F="$B throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096"
  for tag in new old; do
    dir=$NEW; [ $tag = old ] && dir=$OLD
    [ -z "$dir" ] && continue
    TAIL=2 box "B1 bf16 ($tag)" ${B1_S:-60} "$dir" $LAT --output-json "$OUT/b1_$tag.json"
    TAIL=2 box "B1 fp8 ($tag)" ${B1_S:-60} "$dir" $LAT --quantization fp8 --output-json "$OUT/b1_fp8_$tag.json"
    TAIL=2 box "F ($tag)" ${F_S:-0} "$dir" $F --output-json "$OUT/f_$tag.json"
  done
  for d in new old; do [ -f "$OUT/chain_$d/chain.json" ] && echo "chain_$d $(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(json.dumps({k: d[k] for k in ('bf16','fp8') if k in d}))" "$OUT/chain_$d/chain.json")"; done
  show "$OUT"/b1_*.json "$OUT"/f_*.json
} 2>&1 | tee "$OUT/log.txt"
