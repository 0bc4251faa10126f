#!/usr/bin/env bash
# F-LoRA and B1-LoRA (../shared/BENCHMARKS.md, issue 19): Llama-3.1-8B shapes, random bf16 weights,
# one H200. 16 random rank-16 adapters on every q/k/v/o and gate/up/down projection, written as
# PEFT files with safetensors (benchmarks/lora_adapters.py; no peft on the device).
#   F       256 x 512 in / 256 out, no LoRA            vs   F-LoRA  the same, requests spread
#           uniformly over the 16 adapters (--max-loras 16), in the same run. Goal: >= 75%.
#   B1      one request, 512 in / 256 out, no LoRA     vs   B1-LoRA the same with one adapter.
#           Goal: <= 1.15x the ms per output token.
#   bash benchmarks/lora.sh        (repo root; tessellm.egg-info carried for entry points)
# Time boxes (env): LORA_STEP_TIMEOUT (s per step, default 90), LORA_F_PROMPTS (default 256),
# LORA_B1_ITERS (default 3), LORA_KERNEL_BUDGET_S (default 30), LORA_CONFORMANCE=1 to run the
# cuda conformance cases of the LoRA ops first. Order: B1 pair, kernels, F pair (LORA_F_PROMPTS=0
# skips F). Expected total about 3.5-4 minutes on an H200
# (two F runs ~45 s each, two B1 runs ~25 s each, adapters ~15 s, kernels ~30 s).
# Results: $OUT/*.json and $OUT/log.txt.
# Figures (H200, 2026-12-04, commit 589d3e5; benchmarks/results/h200-2026-12-04-wave2b/):
#   F 10,017 tok/s   F-LoRA 9,025 tok/s (90%)   B1 4.158 ms/token   B1-LoRA 5.327 ms (1.28x)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
if [ -d .whl ] && [ -z "${SKIP_WHL:-}" ]; then  # the server wheels, as wave2b_device.sh
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PYTHONPATH
fi
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
M=benchmarks/model-configs/llama-3.1-8b
ADAPTERS=${LORA_ADAPTERS_DIR:-/tmp/tessellm-lora-adapters}
T=${LORA_STEP_TIMEOUT:-90}
N=${LORA_F_PROMPTS:-256}
ITERS=${LORA_B1_ITERS:-3}
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
F_ARGS="--model $M --load-format dummy --num-prompts $N --input-len 512 --output-len 256 --max-model-len 4096"
B1_ARGS="--model $M --load-format dummy --max-model-len 4096 --num-iters $ITERS"
LORA="--enable-lora --max-lora-rank 16"
step() { echo "=== $1"; shift; /usr/bin/time -f "(%e s)" timeout "$T" "$@" 2>&1 | tail -${TAIL:-25}; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  git log -1 --format='commit %H %cd' 2>/dev/null || true
  step adapters python3 benchmarks/lora_adapters.py --config $M --out "$ADAPTERS" --num 16 --rank 16
  step B1 $B latency $B1_ARGS --output-json "$OUT/b1.json"
  step B1-lora $B latency $B1_ARGS $LORA --max-loras 1 --lora-path "$ADAPTERS/a0" --output-json "$OUT/b1_lora.json"
  # The shrink/expand kernels per layer (T = 1/64/256 decode, 2048 prefill) against the
  # bandwidth floor and the base GEMMs (benchmarks/kernels/bench_lora.py, the kernels' owner's).
  if [ -f benchmarks/kernels/bench_lora.py ]; then
    [ "${LORA_CONFORMANCE:-0}" = 1 ] && TAIL=4 step lora-conformance python3 -m tessellm.testing --backend cuda -q -k lora
    step lora-kernel python3 benchmarks/kernels/bench_lora.py --budget-s "${LORA_KERNEL_BUDGET_S:-30}" --json "$OUT/lora_kernel.json"
  fi
  [ "$N" -gt 0 ] && step F $B throughput $F_ARGS --output-json "$OUT/f.json"
  [ "$N" -gt 0 ] && step F-lora $B throughput $F_ARGS $LORA --max-loras 16 --lora-dir "$ADAPTERS" --output-json "$OUT/f_lora.json"
  python3 - "$OUT" <<'PY'
import json, os, sys
out = sys.argv[1]
def get(name, key):
    try:
        return json.load(open(os.path.join(out, name)))[key]
    except (OSError, KeyError, ValueError):
        return None
f, fl = get("f.json", "output_tokens_per_s"), get("f_lora.json", "output_tokens_per_s")
b, bl = get("b1.json", "tpot_ms_median"), get("b1_lora.json", "tpot_ms_median")
print("F", f, "F-LoRA", fl, "ratio", round(fl / f, 3) if f and fl else None, "(goal >= 0.75)")
print("B1", b, "B1-LoRA", bl, "ratio", round(bl / b, 3) if b and bl else None, "(goal <= 1.15)")
PY
} 2>&1 | tee "$OUT/log.txt"
