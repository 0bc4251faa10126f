#!/usr/bin/env bash
# The before/after speed check of a refactor (issues 15 and 21): B1, F, F vs HF (both SDPA
# ways), V, L, fp8 B1 and the attention microbenchmarks, one device session, same command
# before and after. Results: $OUT/results.tar.gz (the JSON files) and $OUT/log.txt.
# Run from the repo root with tessellm.egg-info carried (entry points).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
R=$(mktemp -d)
{
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  OUT=$R SKIP_TESTS=${SKIP_TESTS:-1} WORKLOADS="${WORKLOADS:-B1 F HF V L}" bash benchmarks/gpu_run.sh
  echo "=== fp8 B1"
  python3 benchmarks/quantization/speed.py --engine --configs fp8 --workloads B1 --out "$R/fp8_b1.json" 2>&1 | grep -v Warning | tail -5
  echo "=== attention"
  python3 benchmarks/kernels/bench_attention.py --json "$R/attention.json" 2>&1 | tail -30
} 2>&1 | tee "$OUT/log.txt"
tar -czf "$OUT/results.tar.gz" -C "$R" .
