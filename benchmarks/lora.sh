#!/usr/bin/env bash
# Multi-LoRA (issue 19) on one H200: the batched LoRA kernels per layer (Llama-3.1-8B shapes,
# 16 adapters of rank 16), then the F / B1 workloads with LoRA (added by the engine side).
#   bash benchmarks/lora.sh            (repo root; writes $OUT/*.json and $OUT/lora_log.txt)
# Time boxes (env): LORA_KERNEL_BUDGET_S (default 60: stop starting new batch sizes after it).
# Needs only the device image (torch, triton); the kernel part ~1 minute.
# Figures (fill in from $OUT after the run):
#   per layer, shrink + expand: T=1 ..... us, T=64 ..... us, T=256 ..... us, prefill 2048 ..... us
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
step() { echo "=== $1"; shift; /usr/bin/time -f "(%e s)" "$@" 2>&1 | tail -${TAIL:-40}; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  TAIL=4 step lora-kernel-tests timeout 300 python3 -m pytest -q -x tests/kernels/test_lora.py
  TAIL=4 step lora-conformance timeout 300 python3 -m tessellm.testing --backend cuda -q -k lora
  step lora-kernel timeout 240 python3 benchmarks/kernels/bench_lora.py --budget-s "${LORA_KERNEL_BUDGET_S:-60}" --json "$OUT/lora_kernel.json"
  # ---- engine workloads (F and B1 with and without LoRA): added by the engine side below ----
} 2>&1 | tee "$OUT/lora_log.txt"
