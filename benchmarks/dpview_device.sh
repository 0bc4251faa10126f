#!/usr/bin/env bash
# The data-parallel balancer's view of the host KV tier on 2 GPUs (nvidia-h100-x2):
# LLM(data_parallel_size=2) with Llama-3.1-8B shapes (dummy bf16), benchmarks/dp_prefix_affinity.py
# with --kv-offloading-size: 16 system prompts of 1536 tokens (96 blocks each) x 8 questions, waves
# of 4, 16 tokens out, each core's KV cache capped at 400 blocks (about four prefixes) and a 4 GiB
# host tier per core (about 2000 blocks of 2 MiB: every prefix). Three modes: affinity off, prefix-
# aware but blind to the host tier (the front end drops the host lists: a prefix evicted to the
# tier counts as gone), and the default (a host-tier hit counts 3/4 of a device hit).
# Expect: hit rate (device + host) default >= blind > off, and fewer recomputed prompt tokens
# (the CPU run, waves of 4: 73.4% / 71.4% / 63.5%; one at a time 79.4% / 75.4% / 63.5%), wall time
# shorter where fewer tokens are recomputed. Output: the table on stdout, also $OUT/dpview.txt.
# About 6 minutes (three -dp 2 starts of an 8B model); DPVIEW_S caps it (default 450 s).
# Run: OUT=/tmp/dpview-out bash benchmarks/dpview_device.sh
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH; t / box
nvidia-smi -L
TAIL=8 box dp_prefix_affinity_host ${DPVIEW_S:-450} python3 benchmarks/dp_prefix_affinity.py --device cuda \
  --model ${MODEL:-$L8} --load-format dummy --max-model-len 2048 --prefix-len 1536 --groups 16 \
  --per-group 8 --concurrency ${WAVE:-4} --max-tokens 16 --num-kv-blocks ${KV_BLOCKS:-400} \
  --kv-offloading-size ${HOST_GIB:-4} 2>&1 | tee "$OUT/dpview.txt"
