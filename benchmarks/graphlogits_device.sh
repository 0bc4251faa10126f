#!/usr/bin/env bash
# One logits buffer for every captured graph (core/runner_graphs.py), on one GPU:
# (1) the GPU parity tests that replay CUDA graphs, captured variants only: decode graphs against
#     HF (test_cuda_parity), the decode overlap inside graphs, speculative decoding's verify
#     graphs (ngram, replay), LoRA graphs, the reference device graph runner; with RECUR_S=300
#     also the recurrent-state (mamba2, qwen3_next) verify graphs;
# (2) memprof's F start: Llama-3.1-8B shapes, dummy bf16, 256 x 512 in / 256 out, greedy,
#     max-model-len 4096, gpu_memory_utilization 0.90, no kernel warm-up, F twice in one process
#     (benchmarks/graphlogits_start.py = firstrun.py with the allocator read around the capture).
# ~5 min; run it with a 600 s limit.
#   bash benchmarks/graphlogits_device.sh     (repo root; carry .whl and tessellm.egg-info as usual)
# Expected: "rc=0" and "N passed" for the tests; then
#   [capture] after: ... logits buffer (256, 128256) 0.061 GiB, pool ~0.05-0.1 GiB, reserve ~0.33 GiB
#   memory profile: ... decode graphs reserved ~0.33 GiB (session 22: 1.30, pool 1.04),
#     ~26,930 KV blocks (session 22: 26,431; +499 blocks of 2 MiB: the 0.97 GiB of per-graph logits)
#   RUN 1: ... segments +0 (session 22: +0), RUN 2 the same
# Knobs: TEST_S (the tests' limit, 200), RECUR_S (recurrent verify graphs, 0: skip), F_S (the F
# part's limit, 150; 0 skips), NP (256 prompts), ENGINE (extra firstrun.py engine args, e.g.
# "--gpu-memory-utilization=0.95").
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
CACHE=/tmp/graphlogits-triton; rm -rf "$CACHE"; mkdir -p "$CACHE"
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch; print('torch', torch.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo ${COMMIT:-unknown})"; date -u
  # the captured variants only (enforce_eager True is the eager path; the drafters' own graphs
  # are not this change's)
  TAIL_T=30 t gpu_graph_tests "${TEST_S:-200}" python3 -m pytest -q -p no:cacheprovider -m gpu -rs \
    -k "not True and not draft_model and not eagle" \
    tests/models/test_cuda_parity.py tests/models/test_cuda_decode_overlap.py \
    tests/spec_decode/test_spec_gpu.py tests/lora/test_lora_gpu.py tests/backends/test_device_pieces.py
  TAIL_T=10 t recurrent_verify_graphs "${RECUR_S:-0}" python3 -m pytest -q -p no:cacheprovider -m gpu \
    tests/spec_decode/test_recurrent_verify_graphs.py
  echo "=== F start (limit ${F_S:-150} s) $(date -u +%T)"
  if [ "${F_S:-150}" -gt 0 ]; then
    TRITON_CACHE_DIR=$CACHE timeout "${F_S:-150}" python3 benchmarks/graphlogits_start.py \
      --model "${MODEL:-$L8}" --num-prompts "${NP:-256}" --input-len 512 --output-len 256 \
      --max-model-len 4096 --label f090 --output-json "$OUT/f090.json" ${ENGINE:-} > "$OUT/f090.txt" 2>&1
    echo "rc=$?"
    grep -E "^\[capture\]|^\[f090\] (start|memory|RUN|  device)|decode graphs' pool|OutOfMemory|out of memory|Traceback|Error" \
      "$OUT/f090.txt" | tail -20
  fi
  date -u
} 2>&1 | tee "$OUT/graphlogits_log.txt"
