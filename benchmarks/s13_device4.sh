#!/usr/bin/env bash
# Session 13's fourth call: this session's new kernels on a GPU for the first time. Triton kernel
# tests (attention sinks, soft-cap, deterministic split-K GEMMs, gpt-oss's clamped-SwiGLU MoE,
# fused MoE, attention; KT_S 240), the plugin contract's conformance suite on the cuda backend
# (sinks and multi-head latent attention cases included; CONF_S 150), the wave-2 families on cuda
# against HF on the GPU (gpt-oss, DeepSeek V2-Lite / V3 added; FAM_S 200), B1 bf16 (B1_S 60).
#   bash benchmarks/s13_device4.sh         (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  t kernels ${KT_S:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_attention_sinks.py \
    tests/kernels/test_attention_softcap.py tests/kernels/test_gemm_split_k.py \
    tests/kernels/test_moe_clamped_swiglu.py tests/kernels/test_fused_moe.py tests/kernels/test_triton_attention.py
  t conformance ${CONF_S:-150} python3 -m tessellm.testing --backend cuda -q -rs
  t families ${FAM_S:-200} python3 -m pytest -q -p no:cacheprovider tests/models/test_cuda_families.py
  box "B1 bf16" ${B1_S:-60} $LAT --output-json "$OUT/b1.json"
  [ -f "$OUT/b1.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('b1 TTFT ms', d['ttft_ms_median'], 'ms/token', d['tpot_ms_median'])" "$OUT/b1.json"
} 2>&1 | tee "$OUT/log.txt"
