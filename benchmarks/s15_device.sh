#!/usr/bin/env bash
# Session 15's device call: session 14's kernel tests with their inputs on the GPU, the Mamba
# families against HF on the device's transformers (gpufix), the op-by-op Mamba check, this
# session's new families on cuda (FAM_S), and the conformance cases of the new ops (gated delta
# rule, relu2 experts, whole-sequence key limits, Mamba: CONF_S), the recurrent-state models'
# captured decode graphs against HF and eager (GR_S) and their decode-step timing (GRB_S).
#   bash benchmarks/s15_device.sh   (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
{
  nvidia-smi --query-gpu=name --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  t kernels ${KT_S:-110} python3 -m pytest -q -p no:cacheprovider -rs tests/kernels/test_chunked_attention.py \
    tests/kernels/test_mamba_kernels.py tests/kernels/test_gated_delta_kernels.py \
    "tests/quantization/test_block_fp8.py::test_triton_block_gemm_matches_reference" \
    "tests/quantization/test_block_fp8.py::test_cuda_backend_kernels_serve_a_layer_close_to_the_dequantized_model" \
    "tests/quantization/test_block_fp8_moe.py::test_triton_fused_moe_block_scales_match_reference" \
    tests/models/test_gpt_oss_moe.py ${KT_EXTRA:-}
  t mamba_ops ${MOPS_S:-40} python3 benchmarks/kernels/check_mamba_ops.py; tail -30 "$OUT/mamba_ops.txt"
  t conformance ${CONF_S:-90} python3 -m tessellm.testing --backend cuda -q -rs \
    -k "${CONF_K:-gated_delta or mamba or relu2 or key_limits or whole}"
  t families ${FAM_S:-200} python3 -m pytest -v -p no:cacheprovider -rs tests/models/test_cuda_families.py \
    -k "${FAM_K:-gpt-oss or granite or mamba2 or glm4-moe or cohere2 or ernie or seed-oss or hunyuan or dots1 or apertus}"
  t graphs ${GR_S:-120} python3 -m pytest -v -p no:cacheprovider -rs tests/models/test_cuda_recurrent_state_graphs.py
  t graphs_bench ${GRB_S:-90} python3 benchmarks/recurrent_state_graphs.py --models ${GRB_MODELS:-granite4h mamba2} --batches 1 16 --steps 48
  grep "^{" "$OUT/graphs_bench.txt"
  ${EXTRA_CMD:-true}
} 2>&1 | tee "$OUT/log.txt"
