#!/usr/bin/env bash
# Does the memory profile (core/memory_profile.py) cover speculative decoding, and the decode
# overlap's side stream after graph capture? One GPU, Llama-3.1-8B shapes (dummy bf16), max-model-len
# 2048, a batch of max_num_seqs (256) prompts of 256 tokens, 32 greedy tokens out, in one process
# per part (benchmarks/specprof.py):
#   draft90 / draft95   a Llama-3.2-1B-shaped draft model (random weights), k = 4, every step of
#                       the full batch drafting (disable_by_batch_size 0): verify steps of 256 x 5
#                       rows, at gpu_memory_utilization 0.90 and 0.95
#   eagle90             an EAGLE head of 8B shapes, k = 4, at 0.90 (EAGLE_S, default 0: skipped)
#   overlap90           no speculation, the decode overlap on (mixed steps, 2048-token budget: the
#                       profile step splits, leaving blocks on the side stream), at 0.90
# Goal per part: "start ... memory profile" (the drafter's own peak > 0 with a drafter; the draft
# graphs' pool inside the graphs' reserve), "RUN ... covered" (the batch's step peak not above
# the profile's), segments +0 (or a few small ones), OOMs +0, no OutOfMemoryError, device memory
# "under" its limit; overlap90: "side stream at ready: ... N wholly free cached" with N > 0 (before
# the fix: 0) and its RUN segments +0; side_stream_test: 1 passed (a side stream's free segment
# cached again after a capture). ~4 minutes (Triton cache shared by the parts); 7 at the boxes.
#   bash benchmarks/specprof_device.sh     (repo root; carry .whl and tessellm.egg-info as usual)
# Knobs: D90_S / D95_S / EAGLE_S / OV_S / TEST_S (part limits, seconds; 0 skips), K (draft tokens, 4).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source benchmarks/device_env.sh
CFG=benchmarks/model-configs
K=${K:-4}
DRAFT="{\"method\": \"draft_model\", \"model\": \"$CFG/llama-3.2-1b\", \"num_speculative_tokens\": $K, \"draft_load_format\": \"dummy\", \"disable_by_batch_size\": 0}"
EAGLE="{\"method\": \"eagle\", \"model\": \"$CFG/eagle-llama-3.1-8b\", \"num_speculative_tokens\": $K, \"draft_load_format\": \"dummy\", \"disable_by_batch_size\": 0}"
CACHE=/tmp/specprof-triton; mkdir -p "$CACHE"
part() {  # part NAME SECONDS ARGS...
  local name=$1 secs=$2; shift 2
  echo "=== $name (limit $secs s) $(date -u +%T)"
  [ "$secs" -gt 0 ] || return 0
  TRITON_CACHE_DIR=$CACHE timeout "$secs" python3 benchmarks/specprof.py --model $CFG/llama-3.1-8b \
    --label "$name" --output-json "$OUT/$name.json" "$@" > "$OUT/$name.txt" 2>&1
  echo "rc=$?"
  grep -E "^\[$name\]|OutOfMemory|out of memory|Traceback|Error" "$OUT/$name.txt" | tail -12
}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo ${COMMIT:-unknown})"; date -u
  part draft90 "${D90_S:-130}" --spec "$DRAFT"
  part draft95 "${D95_S:-90}" --spec "$DRAFT" --gpu-memory-utilization 0.95
  part eagle90 "${EAGLE_S:-0}" --spec "$EAGLE"
  part overlap90 "${OV_S:-90}" --decode-overlap --max-num-batched-tokens 2048
  t side_stream_test "${TEST_S:-60}" python3 -m pytest -q -p no:cacheprovider \
    tests/models/test_cuda_decode_overlap.py -k side_streams
} 2>&1 | tee "$OUT/specprof_log.txt"
