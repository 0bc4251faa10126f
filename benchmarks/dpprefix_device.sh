#!/usr/bin/env bash
# The data-parallel balancer's prefix-cache view on 2 GPUs (nvidia-h100-x2): LLM(data_parallel_size=2)
# with Llama-3.1-8B shapes (dummy bf16), benchmarks/dp_prefix_affinity.py: 16 system prompts of
# 1536 tokens x 16 questions, waves of 16, 16 tokens out, each core's KV cache capped at 800 blocks
# (about half the prefixes), once with affinity off (load alone), once prefix-cache aware.
# Expect: the aware balancer's fleet hit rate well above the load-only one's (the CPU run:
# 68% vs 39%) and a shorter wall time (fewer prefills). Output: the table on stdout, also
# $OUT/dpprefix.txt. About 4 minutes (two -dp 2 starts of an 8B model).
# Run: OUT=/tmp/dpprefix-out bash benchmarks/dpprefix_device.sh
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH; t / box
nvidia-smi -L
TAIL=8 box dp_prefix_affinity ${DPPREFIX_S:-420} python3 benchmarks/dp_prefix_affinity.py --device cuda \
  --model ${MODEL:-$L8} --load-format dummy --max-model-len 2048 --prefix-len 1536 --groups 16 \
  --per-group 16 --concurrency 16 --max-tokens 16 --num-kv-blocks ${KV_BLOCKS:-800} 2>&1 | tee "$OUT/dpprefix.txt"
