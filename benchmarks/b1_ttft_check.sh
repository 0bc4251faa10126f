#!/usr/bin/env bash
# TTFT check (issue 22, wave 2e): prefill/decode attention kernels (bench_attention.py) and B1
# TTFT + ms/token, baseline tree first then this tree, 8 iterations each, bf16 and fp8.
#   OLD=/path/to/baseline bash benchmarks/b1_ttft_check.sh   (from this tree's root)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
NEW=$PWD
run() { local dir=$1 secs=$2; shift 2; (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "$secs" "$@" 2>&1) | grep -v -i warn | tail -${TAIL:-14}; }
L8=benchmarks/model-configs/llama-3.1-8b
LAT="python3 -m tessellm.entrypoints.cli --log-level WARNING bench latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 8"
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm --format=csv,noheader; date -u; nproc; uptime
  for t in old new; do d=$NEW; [ $t = old ] && d=$OLD
    echo "=== attention kernels ($t)"; run "$d" 60 python3 benchmarks/kernels/bench_attention.py --json "$OUT/attn_$t.json"; done
  for q in bf16 fp8; do for t in old new; do d=$NEW; [ $t = old ] && d=$OLD
    flag=""; [ $q = fp8 ] && flag="--quantization fp8"
    echo "=== B1 $q ($t) $(date -u +%T)"; TAIL=1 run "$d" 60 $LAT $flag --output-json "$OUT/b1_${q}_$t.json"
    python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], 'ttft', d['ttft_ms'], 'tpot', d['tpot_ms_median'])" "$OUT/b1_${q}_$t.json"
  done; done; uptime
} 2>&1 | tee "$OUT/log.txt"
