#!/usr/bin/env bash
# Speculative decoding on one GPU (docs/speculative_decoding.md), each part time-boxed:
#   SMOLLM_S  real SmolLM2 (bundled GGUF, bf16), n-gram k=3,5 on copy-heavy prompts vs plain, B1
#   SPEC8B_S  Llama-3.1-8B dummy shapes: B1 replay k=1..7 vs plain, and workload F with
#             speculation + load policy vs plain F (one process: the plain run records the replay)
#   DRAFT_S   the draft-model timing hook (benchmarks/spec_decode_draft.py, when present)
# Results: $OUT/spec_*.json and $OUT/spec_decode_log.txt. Total about 4-5 minutes on an H200.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
if [ -d .whl ] && [ -z "${SKIP_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:.
else
  export PYTHONPATH=.
fi
P="python3 benchmarks/spec_decode.py --out $OUT"
{
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  echo "=== smollm n-gram"
  timeout ${SMOLLM_S:-80} $P smollm 2>&1 | grep -v "^INFO" | tail -40
  echo "=== llama-3.1-8b shapes: B1 replay k=1..7, F with the load policy"
  timeout ${SPEC8B_S:-185} $P replay f --f-prompts ${F_PROMPTS:-256} 2>&1 | grep -v "^INFO" | tail -80
  if [ "${DRAFT_S:-0}" -gt 0 ]; then
    echo "=== draft model"
    timeout ${DRAFT_S} $P draft 2>&1 | tail -20
  fi
} 2>&1 | tee "$OUT/spec_decode_log.txt"
