#!/usr/bin/env bash
# Prefix caching for the recurrent-state models on a CUDA GPU (core/state_prefix.py): the hits
# with captured decode graphs and async scheduling (both on by default there), the
# recurrent-state graphs tests, whose preemption cases run with prefix caching on, and the TTFT
# of a prompt whose prefix is cached (benchmarks/mprefix_ttft.py: the serving warm-up first,
# then 4 rounds of fresh prompts; the first round reported apart as cold_ms).
# Run from the repository root: bash benchmarks/mprefix_device.sh   (~5 minutes, 8 at most;
# $OUT gets the logs and, per model and setting, torch profiler tables of B's last round).
# TESTS_S=0 skips the two test files (the TTFT part alone, ~3 minutes); TTFT_S=0 skips the TTFT.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider -m gpu"
t mprefix_cuda ${TESTS_S:-120} $P tests/models/test_recurrent_prefix_cache.py -k cuda
t recurrent_graphs ${TESTS_S:-120} $P tests/models/test_cuda_recurrent_state_graphs.py
t ttft ${TTFT_S:-240} python3 benchmarks/mprefix_ttft.py --models mamba2 granite4h \
  --input-len 3000 --profile "$OUT"
grep '"speedup"' "$OUT/ttft.txt"
# Expect: mprefix_cuda 2 passed; recurrent_graphs all passed; one JSON line per model with
# "layers" 24 (mamba2) / 40 (granite4h), cache_on.cached_tokens 2992 (block 16) and
# cache_on.steps one fewer than before session 19's in-step saves (B's 40 tokens in one prefill
# step, its state after its last full block saved inside it, core/state_prefix.py; before: 32
# tokens to that block, then 8):
# cache_on.ttft_ms about one eager prefill step of a few tokens (step_ms: each step's host
# time), under cache_off.ttft_ms (3032 tokens, one step). cold_ms (the first round) above
# ttft_ms is a first-use cost the warm-up missed; $OUT/mprefix_<model>_cache_on.txt says where
# B's time goes (ops by device and host time).
