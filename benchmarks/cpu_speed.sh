#!/usr/bin/env bash
# CPU speed in one run (issue 22, CPU parts), from the repo root, tessellm importable:
#   C   workload C (../shared/BENCHMARKS.md): tessellm vs HF transformers static batches of 32,
#       interleaved (tessellm, HF, tessellm, HF ... C_ROUNDS times) so load changes hit both
#   B1  batch 1 on the bundled SmolLM2 Q4_1 GGUF, 128-token prompt, greedy, 2 threads:
#       tessellm fp32, tessellm quantization="gguf", llama.cpp (llama-cpp-python; skipped with
#       a message when it is not importable), interleaved rounds (benchmarks/cpu_b1.py); then
#       the eager gguf decode step with its C/Python fast paths on and off (benchmarks/cpu_b1_ab.py)
#   S   the sampler's per-step cost at batch 1 and 256 (benchmarks/sampler_cost.py)
#   INT4  AWQ / GPTQ (SmolLM2 quantized by the test-side packer, groups of 64) against fp32 and
#       the GGUF Q4_1 path, batch-1 decode and 128-token prefill, 2 threads (benchmarks/cpu_int4.py;
#       not in the default PARTS)
# Writes $OUT/{meta.txt,c_*.json,b1.json,sampler.json,int4.json,summary.txt}.
#
#   OUT=benchmarks/results/cpu-$(date -u +%F) bash benchmarks/cpu_speed.sh
#   PARTS="B1 S" B1_ROUNDS=3 C_ROUNDS=1 bash benchmarks/cpu_speed.sh
#
# llama-cpp-python is a benchmark-only dependency; build it once, outside the checkout:
#   python -m venv ~/.cache/tessellm/bench-llamacpp --system-site-packages
#   CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF" ~/.cache/tessellm/bench-llamacpp/bin/pip \
#       install llama-cpp-python          # ~10-30 min from the sdist on 2 cores
# The B1 part then runs with that venv's python (LLAMA_PY), which also sees tessellm.
# GPU hook for the sampler: SAMPLER_DEVICE=cuda SAMPLER_VOCAB=128256 PARTS=S bash ...
set -u
OUT=${OUT:-benchmarks/results/cpu-$(date -u +%F)}
PARTS=${PARTS:-"C B1 S"}
C_ROUNDS=${C_ROUNDS:-1}
B1_ROUNDS=${B1_ROUNDS:-3}
B1_OUT_LEN=${B1_OUT_LEN:-64}
B1_COMPILE=${B1_COMPILE:-0}  # 1: also quantization="gguf" with TESSELLM_CPU_COMPILE=1 (torch.compile)
LLAMA_PY=${LLAMA_PY:-$HOME/.cache/tessellm/bench-llamacpp/bin/python}
source "$(dirname "${BASH_SOURCE[0]}")/cpu_env.sh"

C="--num-prompts 64 --input-len 136 --output-len 136 --random-range-ratio 0.8824 --seed 7"
if [[ " $PARTS " == *" C "* ]]; then
  for i in $(seq "$C_ROUNDS"); do
    echo "== C round $i: tessellm (load $(cut -d' ' -f1 /proc/loadavg))"
    $PY -m tessellm.entrypoints.cli bench throughput $C --dtype float32 \
        --output-json "$OUT/c_tessellm_$i.json" > "$OUT/c_tessellm_$i.log" 2>&1
    echo "== C round $i: HF static batches of 32 (load $(cut -d' ' -f1 /proc/loadavg))"
    $PY -m tessellm.entrypoints.cli bench throughput $C --dtype float32 --backend hf \
        --hf-batch-size 32 --output-json "$OUT/c_hf_$i.json" > "$OUT/c_hf_$i.log" 2>&1
  done
fi
if [[ " $PARTS " == *" B1 "* ]]; then
  B1_PY=$PY; B1_FLAGS=""; [[ "$B1_COMPILE" == 1 ]] && B1_FLAGS="--compile"
  if [[ -x "$LLAMA_PY" ]] && "$LLAMA_PY" -c "import llama_cpp" 2>/dev/null; then
    B1_PY=$LLAMA_PY
  else
    echo "llama-cpp-python is not installed ($LLAMA_PY): B1 runs without llama.cpp (see the header)"
    B1_FLAGS="$B1_FLAGS --no-llama-cpp"
  fi
  echo "== B1 (load $(cut -d' ' -f1 /proc/loadavg))"
  $B1_PY benchmarks/cpu_b1.py --rounds "$B1_ROUNDS" --output-len "$B1_OUT_LEN" $B1_FLAGS \
      --output-json "$OUT/b1.json" > "$OUT/b1.log" 2>&1
  grep "^round" "$OUT/b1.log"
  echo "== B1 eager gguf fast paths on/off, 2 threads (load $(cut -d' ' -f1 /proc/loadavg))"
  $PY benchmarks/cpu_b1_ab.py --threads 2 --rounds "$B1_ROUNDS" > "$OUT/b1_ab.log" 2>&1
  tail -3 "$OUT/b1_ab.log"
fi
if [[ " $PARTS " == *" INT4 "* ]]; then
  echo "== INT4 AWQ / GPTQ vs fp32 and gguf (load $(cut -d' ' -f1 /proc/loadavg))"
  $PY benchmarks/cpu_int4.py --rounds "$B1_ROUNDS" --output-len "$B1_OUT_LEN" \
      --output-json "$OUT/int4.json" > "$OUT/int4.log" 2>&1
  grep "^round" "$OUT/int4.log"
fi
if [[ " $PARTS " == *" S "* ]]; then
  echo "== sampler (load $(cut -d' ' -f1 /proc/loadavg))"
  $PY benchmarks/sampler_cost.py --device "${SAMPLER_DEVICE:-cpu}" --vocab "${SAMPLER_VOCAB:-49152}" \
      --output-json "$OUT/sampler.json"
fi
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$OUT/meta.txt"
$PY - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import glob, json, os, sys
out = sys.argv[1]
def load(p):
    return json.load(open(p)) if os.path.exists(p) else None
tess = [load(p) for p in sorted(glob.glob(f"{out}/c_tessellm_*.json"))]
hf = [load(p) for p in sorted(glob.glob(f"{out}/c_hf_*.json"))]
for i, (t, h) in enumerate(zip(tess, hf), 1):
    if t and h:
        a, b = t["output_tokens_per_s"], h["output_tokens_per_s"]
        print(f"C round {i}: tessellm {a:.1f} vs HF {b:.1f} output tok/s = {a / b:.2f}x (goal 3x)")
b1 = load(f"{out}/b1.json")
if b1:
    for name, e in b1["engines"].items():
        print(f"B1 {name}: decode {e['decode_ms_per_token_median']:.2f} ms/token, prefill "
              f"{e['prefill_ms_median']:.0f} ms" + (f", {e['decode_vs_llama_cpp']}x llama.cpp (goal 1.5x)"
                                                     if "decode_vs_llama_cpp" in e else ""))
    for k, v in b1["greedy_agreement"].items():
        print(f"B1 {k}: {v}")
i4 = load(f"{out}/int4.json")
if i4:
    for name, e in i4["engines"].items():
        print(f"INT4 {name}: decode {e['decode_ms_per_token_median']:.2f} ms/token, prefill "
              f"{e['prefill_ms_median']:.0f} ms")
s = load(f"{out}/sampler.json")
if s:
    for k, v in s["us_per_step"].items():
        print(f"sampler {k}: build {v['build_us']} us, sample {v['sample_us']} us")
EOF
