#!/usr/bin/env bash
# Session 14's closing call: this session's new Triton kernels on a GPU for the first time (key
# limits, Triton MLA split-KV decode + fp8 latent rows, Mamba2 conv1d / SSD scan / state update,
# block-wise fp8 W8A8, chunked local attention: KT_S), the conformance suite on cuda (CONF_S),
# the families on cuda against HF on the GPU (session 14's added, gpt-oss and Gemma 2 again:
# FAM_S), and the MLA kernel micro-benchmark (MLA_S).
#   bash benchmarks/s14_device2.sh   (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  t kernels ${KT_S:-150} python3 -m pytest -q -p no:cacheprovider -rs tests/kernels/test_attention_key_limits.py \
    tests/kernels/test_triton_mla.py tests/kernels/test_chunked_attention.py \
    "tests/quantization/test_block_fp8.py::test_triton_block_gemm_matches_reference" \
    "tests/quantization/test_block_fp8.py::test_cuda_backend_kernels_serve_a_layer_close_to_the_dequantized_model" \
    "tests/quantization/test_block_fp8_moe.py::test_triton_fused_moe_block_scales_match_reference" \
    ${KT_EXTRA:-}
  t mla_bench ${MLA_S:-60} python3 benchmarks/kernels/bench_mla.py --json "$OUT/bench_mla.json"; tail -20 "$OUT/mla_bench.txt"
  t families ${FAM_S:-240} python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_cuda_families.py \
    -k "${FAM_K:-gpt-oss or gemma2 or llama4 or phimoe or granite or mamba2}"
  t conformance ${CONF_S:-170} python3 -m tessellm.testing --backend cuda -q -rs ${CONF_K:+-k "$CONF_K"}
} 2>&1 | tee "$OUT/log.txt"
