#!/usr/bin/env bash
# Session 13's fifth call (short): gpt-oss on cuda after the swiglu_alpha fix, and why the tiny
# Gemma 2's fp32 tokens on cuda left HF-on-the-GPU's at token 16 (HF's top-2 logit gap per step
# on the GPU, float32 matmul settings, transformers version). bash benchmarks/s13_device5.sh
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name --format=csv,noheader; date -u
  timeout ${FAM_S:-70} python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda_families.py -k "gpt-oss" 2>&1 | tail -3
  timeout ${GAP_S:-50} python3 benchmarks/gemma2_gap.py cuda 2>&1 | grep -v -i "warn\|Writing\|Loading" | tail -24
} 2>&1 | tee "$OUT/log.txt"
