#!/usr/bin/env bash
# Issue 22 (GPU), wave 2g: where F's time goes in bf16 and in fp8 (W8A8 at M > 32, fp8 KV):
# benchmarks/profile_timeline.py (prefill-carrying vs pure-decode steps, wall) for both, then
# benchmarks/profile_step.py at batch 256 with fp8 weights and KV (graph GPU time, eager kernel
# table), then F fp8 through `bench throughput` (the figure the goal names).
#   bash benchmarks/f8_probe.sh   (repo root; carry .whl and tessellm.egg-info)
# Time boxes (s): TL_S 70 (each timeline), PROFILE_S 70, F8_S 60.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
        timeout "$secs" "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-40}; }
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
L8=benchmarks/model-configs/llama-3.1-8b
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${COMMIT:-unknown}"; date -u
  TAIL=20 box "timeline F bf16" ${TL_S:-70} python3 benchmarks/profile_timeline.py --output-json "$OUT/tl_bf16.json"
  TAIL=20 box "timeline F fp8 + fp8 KV" ${TL_S:-70} python3 benchmarks/profile_timeline.py --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/tl_fp8.json"
  TAIL=45 box "profile batch 256 fp8 + fp8 KV" ${PROFILE_S:-70} python3 benchmarks/profile_step.py --batch 256 --steps 10 --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/profile_fp8.json"
  F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096"
  TAIL=3 box "F fp8" ${F8_S:-60} $B $F --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/f_fp8.json"
} 2>&1 | tee "$OUT/log.txt"
