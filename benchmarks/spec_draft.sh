#!/usr/bin/env bash
# Speculative decoding, model-based proposers on one GPU: B1 (512-token prompt, 256 greedy tokens)
# on Llama-3.1-8B shapes with random weights, without speculation and with a Llama-3.2-1B-shaped
# draft model, an EAGLE head and an EAGLE-3 head of 8B shapes (random: what drafting costs);
# ms per draft step. One engine per method, in turn. Results in $OUT/spec_draft.json.
# Time boxes: SPEC_DRAFT_METHODS (default "plain draft_model eagle eagle3"), SPEC_DRAFT_K (3),
# SPEC_DRAFT_OUTPUT (256 tokens), SPEC_DRAFT_TIMEOUT (seconds for everything, 200).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
timeout "${SPEC_DRAFT_TIMEOUT:-200}" python3 benchmarks/spec_decode_draft.py \
  --methods "${SPEC_DRAFT_METHODS:-plain draft_model eagle eagle3}" --k "${SPEC_DRAFT_K:-3}" \
  --output-len "${SPEC_DRAFT_OUTPUT:-256}" --output-json "$OUT/spec_draft.json" 2>&1 \
  | grep -v "Writing model shards" | tee "$OUT/spec_draft.log" | tail -20
