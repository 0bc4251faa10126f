#!/usr/bin/env bash
# The forkserver's preload on a GPU (distributed/spawn.py _PRELOAD): what a CUDA engine start
# still imports after it (and whether any of those imports initializes CUDA), and LLM start
# times from a warm forkserver, TP=1 and, with 2+ GPUs, TP=2. Under 3 minutes.
#   bash benchmarks/polish_device.sh      (outputs in $OUT/preload_*.txt)
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
TAIL=4 box preload_tp1 240 python3 benchmarks/preload_probe.py --device cuda --tp 1 | tee "$OUT/preload_tp1.txt"
if [ "$(nvidia-smi -L 2>/dev/null | wc -l)" -ge 2 ]; then
  TAIL=4 box preload_tp2 240 python3 benchmarks/preload_probe.py --device cuda --tp 2 | tee "$OUT/preload_tp2.txt"
fi
