#!/usr/bin/env bash
# Issue 22 (GPU) and 24 (MoE speed): each goal worked on, side by side with its baseline, in one
# device session (one H200), every step time-boxed:
#   1. prefill attention: old tiles / new tiles / SDPA flash / SDPA's default (cuDNN), 1x512,
#      16x512, 2k, 8k causal, CUDA-graph GPU time (benchmarks/kernels/gpuperf_probe.py attn_quick)
#   2. fused MoE per layer (Qwen3-30B-A3B shapes, routing included), 1, 8, 64, 4096 tokens, L2
#      flushed (moe_quick): 5b0d0f4's code / main at 1550193's (gpuperf) / now without PDL / now
#      with PDL as in the engine's graphs (moefast: one routing launch, grid bounded by T*k,
#      SiLU in GEMM 1, one-launch top-k sum); host us per call of the fp8 W8A8 prefill GEMM's
#      pieces, before/after (host)
#   3. B1 (512-token prompt: TTFT; ms per output token), Llama-3.1-8B shapes, random weights,
#      one process each: bf16, fp8 with the W8A8 path as before (TESSELLM_FP8_LEAN_W8A8=0),
#      fp8 as now
#   4. MoE B1 (Qwen3-30B-A3B shapes): `tessellm bench latency` (6.70 ms/token at 5b0d0f4, 4.57 at
#      1550193 on 2026-12-04; after only: the before is those runs')
#   5. GPU tests of the kernels changed (fused MoE + alignment, fp8 GEMMs, prefill attention)
# Time boxes (seconds; 0 skips): KERNELS_S 55, B1_S 60 (each of 3), MOE_B1_S 80, TEST_S 50.
# Typically ~4 min in all (a fresh machine compiles the Triton kernels in the first B1 run).
#   bash benchmarks/speed_device.sh      (repo root; .whl/ and tessellm.egg-info carried)
# Results: $OUT/log.txt and $OUT/results.tar.gz (one JSON per step).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
R=$(mktemp -d)
P="python3 benchmarks/kernels/gpuperf_probe.py --out $R"
# box NAME SECONDS CMD...: run CMD under a time limit; SECONDS 0 skips the step.
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s)";
        [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-40}; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  if [ -n "${COMMIT:-}" ]; then echo "commit $COMMIT"; else git log -1 --format='commit %H %cd'; fi
  date -u
  box "attention, moe, fp8 host cost" ${KERNELS_S:-55} $P --sections attn_quick moe_quick host
  LAT="python3 -m tessellm.entrypoints.cli --log-level WARNING bench latency --load-format dummy --max-model-len 4096"
  L8=benchmarks/model-configs/llama-3.1-8b
  TAIL=3 box "B1 bf16" ${B1_S:-60} $LAT --model $L8 --num-iters 5 --output-json "$R/b1_bf16.json"
  TAIL=3 TESSELLM_FP8_LEAN_W8A8=0 box "B1 fp8 before" ${B1_S:-60} $LAT --model $L8 --quantization fp8 \
    --num-iters 5 --output-json "$R/b1_fp8_before.json"
  TAIL=3 box "B1 fp8 after" ${B1_S:-60} $LAT --model $L8 --quantization fp8 --num-iters 5 \
    --output-json "$R/b1_fp8_after.json"
  for f in b1_bf16 b1_fp8_before b1_fp8_after; do
    [ -f "$R/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'TTFT ms', d['ttft_ms'], 'ms/token', d['tpot_ms_median'])" "$R/$f.json" $f
  done
  TAIL=3 box "moe B1" ${MOE_B1_S:-80} $LAT --model benchmarks/model-configs/qwen3-30b-a3b \
    --num-iters 2 --output-json "$R/b1_moe.json"
  [ -f "$R/b1_moe.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('moe B1 TTFT ms', d['ttft_ms'], 'ms/token', d['tpot_ms_median'])" "$R/b1_moe.json"
  TAIL=4 box "gpu tests" ${TEST_S:-50} python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_fused_moe.py tests/quantization/test_kernels.py \
    tests/kernels/test_triton_attention.py
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/results.tar.gz" -C "$R" .
