#!/usr/bin/env bash
# n-gram speculation on this CPU (issue 25): the bundled SmolLM2 (fp32, real weights) on
# copy-heavy prompts, batch 1, plain vs n-gram k=3 and k=5 in interleaved rounds of one run
# (benchmarks/spec_cpu.py). Run it when `uptime` shows a low load (the 2 cores are shared):
#
#   OUT=benchmarks/results/cpu-$(date -u +%F)-spec bash benchmarks/spec_cpu.sh
#   ROUNDS=3 TOKENS=128 bash benchmarks/spec_cpu.sh
#
# Writes $OUT/meta.txt and $OUT/spec_cpu.json (ms per output token, speedup, acceptance length).
set -u
OUT=${OUT:-benchmarks/results/cpu-$(date -u +%F)-spec}
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"
timeout "${SPEC_CPU_S:-900}" $PY benchmarks/spec_cpu.py --out "$OUT" --rounds "${ROUNDS:-2}" \
  --tokens "${TOKENS:-96}" --ks ${KS:-3 5} 2>&1 | grep -v "^INFO" | tail -60
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/meta.txt"
