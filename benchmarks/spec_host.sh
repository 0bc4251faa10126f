#!/usr/bin/env bash
# The host work of a speculative step on this CPU (issue 25), a proxy for the host-bound GPU
# regime of SmolLM2-135M: a random 2-layer Llama (hidden 64) whose forward is cheap, plain vs
# n-gram k = 3 / 5 / 8 (and k = 5 with async scheduling), batch 1 and batch 8, engines side by
# side in interleaved rounds; per-step host time split by phase (benchmarks/spec_host.py).
# Run it when `uptime` shows a low load (the 2 cores are shared):
#
#   OUT=benchmarks/results/cpu-$(date -u +%F)-spechost bash benchmarks/spec_host.sh
#   ROUNDS=5 TOKENS=256 bash benchmarks/spec_host.sh
#
# Writes $OUT/meta.txt and $OUT/spec_host.json (ms per output token, speed-up, tokens per step,
# acceptance, phase ms per step and per token). About a minute at ROUNDS=3.
set -u
OUT=${OUT:-benchmarks/results/cpu-$(date -u +%F)-spechost}
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"
timeout "${SPEC_HOST_S:-600}" $PY benchmarks/spec_host.py --out "$OUT" --rounds "${ROUNDS:-3}" \
  --tokens "${TOKENS:-256}" --ks ${KS:-3 5 8} --async 2>&1 | grep -v "^INFO" | tail -20
$PY benchmarks/spec_host.py --table "$OUT/spec_host.json" | tee "$OUT/table.md"
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/meta.txt"
