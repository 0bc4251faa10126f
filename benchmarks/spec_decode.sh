#!/usr/bin/env bash
# Speculative decoding on one GPU (docs/speculative_decoding.md), each part time-boxed:
#   SPEC8B_S  Llama-3.1-8B dummy shapes: B1 plain vs replay with forced acceptance k=1..7, where a
#             verify pass's time goes (graph replays, attention kernels, host profile), and
#             workload F with speculation + load policy vs plain F (each twice, in turn);
#             SPEC8B_PARTS="replay" for B1 and the verify cost alone (~60 s)
#   SMOLLM_S  real SmolLM2 (GGUF in $SMOL_GGUF), n-gram k=3,5,8 on copy-heavy prompts vs plain, B1
#             (benchmarks/spec_smollm2.sh; skipped when SMOL_GGUF is unset)
#   DRAFT_S   the draft-model timing hook (benchmarks/spec_decode_draft.py, when present)
# Results: $OUT/spec_8b.json, $OUT/spec_verify_profile.txt, $OUT/spec_smollm.json,
# $OUT/spec_decode_log.txt. About 2.5 minutes on an H200 (8B part ~110 s, SmolLM2 ~60 s).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
export SKIP_WHL=1
P="python3 benchmarks/spec_decode.py --out $OUT"
{
  git log -1 --format='commit %H %cd' 2>/dev/null || echo "commit ${COMMIT:-unknown}"
  if [ "${SPEC8B_S:-200}" -gt 0 ]; then
    echo "=== llama-3.1-8b shapes: B1 replay forced k=1..7, verify cost, F with the load policy"
    timeout ${SPEC8B_S:-200} $P ${SPEC8B_PARTS:-replay f} --f-prompts ${F_PROMPTS:-256} 2>&1 | grep -v -E "^(INFO|DEBUG)" | tail -60
  fi
  if [ -n "${SMOL_GGUF:-}" ] && [ "${SMOLLM_S:-150}" -gt 0 ]; then
    echo "=== smollm2 n-gram"
    SMOL_S=${SMOLLM_S:-150} bash benchmarks/spec_smollm2.sh 2>&1 | tail -30
  fi
  if [ "${DRAFT_S:-0}" -gt 0 ]; then
    echo "=== draft model"
    timeout ${DRAFT_S} $P draft 2>&1 | tail -20
  fi
} 2>&1 | tee "$OUT/spec_decode_log.txt"
