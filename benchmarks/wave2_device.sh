#!/usr/bin/env bash
# The wave-2 device session (2026-12-04), part B: the new features' GPU figures, each time-boxed.
#   1. GPU tests of the new kernels (fused MoE, token bitmask) and the cuda parity tests
#   2. ready-means-warm: fresh server, empty Triton cache, S at 4 req/s; restart with the cache
#      kept, S at 16 req/s (benchmarks/serve_ready.sh)
#   3. F with a JSON schema on every request vs plain F (benchmarks/structured_output.sh)
#   4. Qwen3-30B-A3B shapes: the fused MoE kernel per layer, B1 and F (benchmarks/moe_run.sh
#      without its HF run)
# Part A is benchmarks/before_after.sh. Wheels for the server and xgrammar travel in .whl/.
# Results: $OUT/log.txt and $OUT/results.tar.gz.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
R=$(mktemp -d)
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
M=benchmarks/model-configs/qwen3-30b-a3b
{
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  echo "=== gpu tests"
  timeout ${TEST_S:-150} python3 -m pytest -q -x -p no:cacheprovider tests/kernels/test_fused_moe.py \
    tests/kernels/test_bitmask.py tests/models/test_cuda_parity.py 2>&1 | tail -8
  echo "=== ready means warm"
  OUT=$R RUNS=${READY_RUNS:-cold4:4 warm16:16} timeout ${READY_S:-300} bash benchmarks/serve_ready.sh 2>&1 | tail -20
  echo "=== structured output"
  OUT=$R timeout ${SO_S:-120} bash benchmarks/structured_output.sh 2>&1 | tail -25
  echo "=== moe kernel"
  timeout ${MOE_KERNEL_S:-60} python3 benchmarks/kernels/bench_fused_moe.py --json "$R/moe_kernel.json" 2>&1 | tail -12
  echo "=== moe B1"
  timeout ${MOE_B1_S:-120} $B latency --model $M --load-format dummy --max-model-len 4096 --num-iters 2 --output-json "$R/b1_moe.json" 2>&1 | tail -8
  [ "${MOE_F_S:-150}" -gt 0 ] && echo "=== moe F" && timeout ${MOE_F_S:-150} $B throughput --model $M --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --output-json "$R/f_moe.json" 2>&1 | tail -8
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/results.tar.gz" -C "$R" .
