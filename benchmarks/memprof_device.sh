#!/usr/bin/env bash
# Does the memory profile (core/memory_profile.py) cover the first real run? One GPU, Llama-3.1-8B
# shapes (dummy bf16), workload F (256 x 512 in / 256 out, greedy, max-model-len 4096, default
# max-num-batched-tokens), no kernel warm-up, F twice in one process (benchmarks/firstrun.py),
# at gpu_memory_utilization 0.90 (default) and 0.95. ~2.5 min; run it with a 600 s limit.
# Per part: "memory profile: step peak, decode graphs reserved / pool, free at sizing, KV
# blocks", then per run "reserved before -> after, segments +n, ..., peak" and the device memory
# used after it. Goal: run 1 "segments +0" (or a few small ones) and reserved growth ~0 (before
# the fix: +9 segments, 67.35 -> 69.91 GiB), the graphs' pool within its reserve, and the 0.95
# part finishing without an out-of-memory error, its device memory under 0.95 x total.
#   bash benchmarks/memprof_device.sh     (repo root; carry .whl and tessellm.egg-info as usual)
# Knobs: U90_S / U95_S (part limits, seconds; 0 skips), NP, ENGINE (extra firstrun.py args).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
P="python3 benchmarks/firstrun.py --model ${MODEL:-$L8} --num-prompts ${NP:-256} --input-len 512 --output-len 256 --max-model-len 4096"
CACHE=/tmp/memprof-triton; rm -rf "$CACHE"; mkdir -p "$CACHE"
part() {  # part NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit $secs s) $(date -u +%T)"
  [ "$secs" -gt 0 ] || return 0
  TRITON_CACHE_DIR=$CACHE timeout "$secs" $P --label "$name" --output-json "$OUT/$name.json" \
    ${ENGINE:-} "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$?"
  grep -E "^\[$name\] (start|memory|RUN|  device|SUMMARY)|OutOfMemory|out of memory|Traceback|Error" \
    "$OUT/$name.txt" | tail -20
}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo ${COMMIT:-unknown})"; date -u
  part util090 "${U90_S:-120}"
  part util095 "${U95_S:-100}" --gpu-memory-utilization=0.95
} 2>&1 | tee "$OUT/memprof_log.txt"
