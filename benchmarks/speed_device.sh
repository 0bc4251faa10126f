#!/usr/bin/env bash
# Issue 22 (GPU) and 24 (MoE speed): each goal worked on, side by side with its baseline, in one
# device session (one H200), every step time-boxed (defaults total under ~5 min):
#   1. prefill attention: old tiles / new tiles / SDPA flash / SDPA's default (cuDNN), 1x512,
#      16x512, 2k, 8k causal, CUDA-graph GPU time (benchmarks/kernels/gpuperf_probe.py attn_quick)
#   2. fused MoE per layer (Qwen3-30B-A3B shapes, routing included): before (torch alignment,
#      old tiles) / after, 1, 8, 64, 4096 tokens, L2 flushed (moe_quick)
#   3. fp8 prefill: host us per call of the W8A8 GEMM's pieces, before/after (host); engine
#      TTFT for a 512-token prompt and B1 ms/token with fp8 weights, before/after, and bf16, in
#      one process (engine; Llama-3.1-8B shapes, random weights)
#   4. MoE B1 (Qwen3-30B-A3B shapes): `tessellm bench latency` (6.70 ms/token on 2026-12-04)
#   5. GPU tests of the kernels changed (fused MoE + alignment, fp8 GEMMs, prefill attention)
# Time boxes (seconds; 0 skips): KERNELS_S 60, ENGINE_S 100, MOE_B1_S 90, TEST_S 50.
#   bash benchmarks/speed_device.sh      (repo root; .whl/ and tessellm.egg-info carried)
# Results: $OUT/log.txt and $OUT/results.tar.gz (one JSON per section).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
R=$(mktemp -d)
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
P="python3 benchmarks/kernels/gpuperf_probe.py --out $R"
# box NAME SECONDS CMD...: run CMD under a time limit; SECONDS 0 skips the step.
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s)";
        [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-40}; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit: ${COMMIT:-unknown}"
  date -u
  box "attention, moe, host" ${KERNELS_S:-60} $P --sections attn_quick moe_quick host
  TAIL=16 box "engine: fp8 before/after, bf16" ${ENGINE_S:-100} $P --sections engine
  TAIL=8 box "moe B1" ${MOE_B1_S:-90} python3 -m tessellm.entrypoints.cli --log-level WARNING \
    bench latency --model benchmarks/model-configs/qwen3-30b-a3b --load-format dummy \
    --max-model-len 4096 --num-iters 2 --output-json "$R/b1_moe.json"
  TAIL=4 box "gpu tests" ${TEST_S:-50} python3 -m pytest -q -x -p no:cacheprovider \
    tests/kernels/test_fused_moe.py tests/quantization/test_kernels.py \
    tests/kernels/test_triton_attention.py
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/results.tar.gz" -C "$R" .
