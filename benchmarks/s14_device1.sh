#!/usr/bin/env bash
# Session 14's first call (H100 or H200): the GPU re-runs session 13 left owed. Kernel tests of
# the fixes not yet run on a GPU (gpt-oss's clamped-SwiGLU MoE epilogue rounding, deterministic
# split-K: KT_S), the conformance suite on cuda (CONF_S), the wave-2 families on cuda against HF
# on the GPU (gpt-oss after the swiglu_alpha fix, Gemma 2's fp32 case: FAM_S), HF's top-2 gaps on
# the tiny Gemma 2 there (gemma2_gap.py), and the bf16 decode-attention launch sweep at
# batch 256 (SWEEP_S; the table has fp8 entries only, chosen on an H200).
#   bash benchmarks/s14_device1.sh   (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  t kernels ${KT_S:-150} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_gemm_split_k.py \
    tests/kernels/test_moe_clamped_swiglu.py
  t conformance ${CONF_S:-150} python3 -m tessellm.testing --backend cuda -q -rs
  t families ${FAM_S:-200} python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda_families.py -rs
  t gemma2_gap 60 python3 benchmarks/gemma2_gap.py cuda; tail -22 "$OUT/gemma2_gap.txt"
  t sweep ${SWEEP_S:-120} python3 benchmarks/quantization/decode_sweep.py --kinds bfloat16 --batches 256 \
    --table-kinds bfloat16 --split-factors 2 --out "$OUT/sweep.json"; tail -25 "$OUT/sweep.txt"
} 2>&1 | tee "$OUT/log.txt"
