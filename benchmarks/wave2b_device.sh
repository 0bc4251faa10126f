#!/usr/bin/env bash
# The second wave-2 device session (one H200, 2026-12-04), in three calls of under 10 minutes:
#   PART=A  GPU tests of what landed (sampling argmax, LoRA ops, spec decode, the new families
#          on cuda), the cuda conformance suite, and a fresh server's workload S at 16 req/s
#          served twice (pass 1 cold after /ready, pass 2 warm: serve_ready.sh PASSES=2)
#   PART=B  benchmarks/speed_device.sh (prefill attention vs SDPA, fused MoE, B1 bf16/fp8,
#          MoE B1) and F with a JSON schema vs F (benchmarks/structured_output.sh)
#   PART=C  speculative decoding (benchmarks/spec_decode.sh), multi-LoRA (benchmarks/lora.sh)
# Each step is time-boxed by an env variable (seconds; 0 skips it). Wheels for the server and
# xgrammar travel in .whl/. Results: $OUT/log_<part>.txt and $OUT/results_<part>.tar.gz.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
PART=${PART:-A}
R=$(mktemp -d)
export SKIP_WHL=1  # the scripts below would install the same wheels again
# step NAME SECONDS CMD...: CMD under a time limit; SECONDS 0 skips it.
step() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
         [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -${TAIL:-60}; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  echo "commit ${COMMIT:-$(git log -1 --format=%H 2>/dev/null)}"
  if [ "$PART" = A ]; then
    GPU_TESTS=$(ls tests/kernels/test_sampling_kernels.py tests/kernels/test_gemv.py \
                   tests/kernels/test_fused_moe.py tests/kernels/test_triton_attention.py \
                   tests/quantization/test_kernels.py \
                   tests/kernels/test_lora*.py tests/models/test_cuda_families.py \
                   tests/models/test_cuda_parity.py tests/spec_decode/test_spec_gpu.py \
                   tests/lora/test_*gpu*.py 2>/dev/null)
    TAIL=25 step "gpu tests" ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider $GPU_TESTS
    TAIL=12 step "cuda conformance" ${CONF_S:-70} python3 -m tessellm.testing --backend cuda -q
    OUT=$R RUNS=${READY_RUNS:-cold16:16} PASSES=2 NUM_PROMPTS=${READY_PROMPTS:-250} TAIL=20 step "ready means warm" ${READY_S:-125} \
      bash benchmarks/serve_ready.sh
  elif [ "$PART" = B ]; then
    OUT=$R KERNELS_S=55 B1_S=${B1_S:-0} MOE_B1_S=60 TEST_S=0 TAIL=80 step "speed (issue 22/24)" ${SPEED_S:-130} \
      bash benchmarks/speed_device.sh
    OUT=$R SO_BEFORE=${SO_BEFORE:-0} SO_S=${SO_PY_S:-130} TAIL=30 step "structured output" ${SO_BOX_S:-175} \
      bash benchmarks/structured_output.sh
  else
    OUT=$R SMOLLM_S=${SMOLLM_S:-70} SPEC8B_S=${SPEC8B_S:-170} TAIL=80 step "speculative decoding" \
      ${SPEC_S:-250} bash benchmarks/spec_decode.sh
    OUT=$R TAIL=40 step "multi-LoRA" ${LORA_S:-250} bash benchmarks/lora.sh
  fi
} 2>&1 | tee "$OUT/log_$PART.txt"
tar -czf "$OUT/results_$PART.tar.gz" -C "$R" .
