#!/usr/bin/env bash
# The parallel Mamba2 prefill scan (kernels/mamba/ssd.py: chunked SSD in five parallel launches,
# what the cuda backend's mamba_chunk_scan runs) on one GPU, ~5 minutes (each part time-boxed,
# 10 at most): the Mamba kernels against the pure-torch ops (tests/kernels, compiled for the
# GPU), each Mamba op against the reference at released models' sizes (check_mamba_ops.py),
# the Mamba conformance on the real cuda backend (many-chunk prefill chunks included), the cuda
# hybrid model tests (greedy fp32 parity with HF through the Triton path, recurrent-state
# graphs, prefix-cache hits), the micro-bench of one layer's scan, SSD against the sequential
# kernel it replaces, and the TTFT of 3000-token prompts (mprefix_ttft.py: cache_off.ttft_ms is
# the full prefill).
# Run from the repository root: bash benchmarks/ssd_device.sh   (OUT=... for the logs)
# Expect: ssd_kernels all passed; ssd_check rc=0; ssd_conformance all passed (no skips);
# ssd_families all passed (4: two tests, two families); ssd_graphs all passed; ssd_prefix 2
# passed; ssd_bench rc=0 and a table per model and length (seq ms: the old kernel, ssd ms: the
# new, x: the speed-up; each diff below 2e-2); ttft: one JSON line per model, cache_off.ttft_ms
# well under this morning's ~57 ms (mamba2) / ~125 ms (granite4h).
source benchmarks/device_env.sh
export TESSELLM_SSD_SCAN=1  # the SSD kernels are opt-in until this run shows them right
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider"
t ssd_kernels 60 $P tests/kernels/test_mamba_kernels.py
t ssd_check 60 python3 benchmarks/kernels/check_mamba_ops.py
t ssd_conformance 60 python3 -m tessellm.testing --backend cuda -q -k mamba
t ssd_families 60 $P -m gpu tests/models/test_cuda_families.py -k "mamba2 or granite-4h"
t ssd_graphs 90 $P -m gpu tests/models/test_cuda_recurrent_state_graphs.py
t ssd_prefix 60 $P -m gpu tests/models/test_recurrent_prefix_cache.py -k cuda
TAIL_T=20 t ssd_bench 90 python3 benchmarks/kernels/bench_ssd_scan.py
grep -E "^(model|mamba2|granite|largest)" "$OUT/ssd_bench.txt"
t ttft 150 python3 benchmarks/mprefix_ttft.py --models mamba2 granite4h --input-len 3000
grep '"speedup"' "$OUT/ttft.txt"
