#!/usr/bin/env bash
# The lead's device calls of the third wave-2 session (one H200, 2026-12-04), two calls back to back
# on one warm machine (the bundled SmolLM2 GGUF, 98 MB, is over one call's 64 MiB, so it travels in
# two halves: .gpuperf/smol/part00 with call A, part01 with call B; sha256 in .gpuperf/smol/sha256):
#   PART=A  keep the first half in /tmp/smol; GPU tests of what landed (verify through the split-KV
#          decode kernel, small-batch MoE path, LoRA kernels, spec decode on cuda, families) and the
#          cuda conformance suite
#   PART=B  assemble the GGUF, check its sha256, SmolLM2 n-gram vs plain (benchmarks/spec_smollm2.sh);
#          F with replay k=3 and the load policy against plain F, the speculative engine with async
#          scheduling on (SPEC_ASYNC=1 benchmarks/spec_decode.sh)
# Boxes (seconds, 0 skips): TEST_S, CONF_S, SMOL_S, SPECF_S. Results: $OUT/log_<part>.txt, $OUT/spec_smollm.json.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
PART=${PART:-A}
export SKIP_WHL=1
step() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
         [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -${TAIL:-60}; }
mkdir -p /tmp/smol
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  echo "commit ${COMMIT:-$(git log -1 --format=%H 2>/dev/null)}"
  if [ "$PART" = A ]; then
    [ -f .gpuperf/smol/part00 ] && cp .gpuperf/smol/part00 /tmp/smol/a && echo "first half kept"
    GPU_TESTS=$(ls tests/spec_decode/test_spec_gpu.py tests/kernels/test_triton_attention.py \
                   tests/kernels/test_lora*.py tests/lora/test_lora_gpu.py tests/lora/test_lora_triton.py \
                   tests/kernels/test_fused_moe.py tests/models/test_cuda_parity.py 2>/dev/null)
    TAIL=25 step "gpu tests" ${TEST_S:-200} python3 -m pytest -q -p no:cacheprovider $GPU_TESTS
    TAIL=12 step "cuda conformance" ${CONF_S:-60} python3 -m tessellm.testing --backend cuda -q
  else
    cat /tmp/smol/a .gpuperf/smol/part01 > /tmp/smol/s.gguf && \
      echo "$(cut -d' ' -f1 .gpuperf/smol/sha256)  /tmp/smol/s.gguf" | sha256sum -c || exit 3
    SMOL_GGUF=/tmp/smol/s.gguf TAIL=40 step "SmolLM2 n-gram" ${SMOL_S:-170} bash benchmarks/spec_smollm2.sh
    SPEC_ASYNC=1 SPEC8B_PARTS=f SPEC8B_S=${SPECF_S:-150} SMOLLM_S=0 TAIL=30 step "F with speculation, async" \
      $(( ${SPECF_S:-150} + 10 )) bash benchmarks/spec_decode.sh
  fi
} 2>&1 | tee "$OUT/log_$PART.txt"
