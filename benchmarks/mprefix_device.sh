#!/usr/bin/env bash
# Prefix caching for the recurrent-state models on a CUDA GPU (core/state_prefix.py): the hits
# with captured decode graphs and async scheduling (both on by default there), and the
# recurrent-state graphs tests, whose preemption cases now run with prefix caching on.
# Run from the repository root: bash benchmarks/mprefix_device.sh   (~4 minutes, 8 at most; $OUT gets the logs)
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider -m gpu"
t mprefix_cuda 180 $P tests/models/test_recurrent_prefix_cache.py -k cuda
t recurrent_graphs 180 $P tests/models/test_cuda_recurrent_state_graphs.py
t ttft 150 python3 benchmarks/mprefix_ttft.py --models mamba2 granite4h --input-len 3000
grep '"speedup"' "$OUT/ttft.txt"
# Expect: mprefix_cuda 2 passed; recurrent_graphs all passed; one JSON line per model with
# cache_on.cached_tokens 2992 (block 16) and speedup well above 1 (B computes 40 tokens instead of 3032).
