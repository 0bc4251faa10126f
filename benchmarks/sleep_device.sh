#!/bin/bash
# Sleep mode on one GPU (docs/sleep_mode.md): tiny-model correctness with CUDA graphs, then the
# memory freed and the sleep / wake_up times on Llama-3.1-8B shapes. ~3 minutes on an H100.
# Run from the repository root: bash benchmarks/sleep_device.sh; output in $OUT/sleep.txt.
source benchmarks/device_env.sh
TAIL_T=40 t sleep 420 python3 benchmarks/sleep_device.py
grep -E "^(PASS|FAIL)|8B bf16" "$OUT/sleep.txt"
