#!/usr/bin/env bash
# Issue 22, B1 (session 18, b1fp8): the one-row GEMVs reading weights before their PDL wait
# (TESSELLM_GEMV_PREWAIT, default off: "N" weight tiles into registers, "s" scales and bias,
# "l2" the program's weight slice asked of the L2, joined by "+"), off vs on in one call.
#
#   bash benchmarks/b1pre_device.sh          # from the repo root; ~7 min on a warm H100/H200
#
# Parts (each time-boxed with device_env.sh's t helper; SECONDS 0 skips one):
#   1. GPU tests (TESTS_S 80): tests/kernels/test_gemv_prewait.py (every setting bitwise the
#      plain kernel, the L2 request compiled and run under PDL), test_gemv_silu.py, the tiled
#      x2 cases of test_gemv.py (flag off: the refactored epilogue). PARITY_S (default 0:
#      skipped): fp32 greedy parity with HF on cuda with TESSELLM_GEMV_PREWAIT=2+l2+s
#      (tests/models/test_cuda_parity.py).
#   2. The B1 kernel chain (decode_chain.py --sections prewait, CHAIN_S 150): 32 layers + LM
#      head in one CUDA graph with PDL, as the engine runs them (SiLU fold; fp8 with the e4m3
#      LM head), at each setting of PREWAIT_FP8 / PREWAIT_BF16 ("0" first and last: the
#      spread), each checked bitwise against "0"; then the GEMVs alone (GEMV after GEMV).
#   3. Engine B1 (bench latency: Llama-3.1-8B shapes, dummy weights, 512-token prompt, 256
#      greedy tokens, 3 iterations), one process each, back to back: fp8 (always with
#      TESSELLM_FP8_LM_HEAD=1) off, then at the chain's fastest fp8 setting (PRE_FP8
#      overrides); bf16 off, then at the chain's fastest bf16 setting (PRE_BF16); then fp8
#      off and bf16 off again (the spread) if time is left. B1_FIRST_S 100 for the first (it
#      may compile on a fresh machine), B1_S 50 each after; a run starts only while the
#      script is under DEADLINE (400) seconds.
#   4. One SUMMARY line per measurement on stdout (also $OUT/summary.txt).
# Output: $OUT (default /tmp/tessellm-out): device.txt, tests*.txt, chain_prewait.txt,
# prewait.json, b1_*.json / .txt, summary.txt.
set -u
. benchmarks/device_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"; date -u
} | tee "$OUT/device.txt"

PYT="python3 -m pytest -q -p no:cacheprovider"
t tests ${TESTS_S:-80} $PYT tests/kernels/test_gemv_prewait.py tests/kernels/test_gemv_silu.py \
  tests/kernels/test_gemv.py -k "prewait or silu or (fp8_x2 and not streamed)"
t tests_parity ${PARITY_S:-0} env TESSELLM_GEMV_PREWAIT=2+l2+s $PYT -x \
  tests/models/test_cuda_parity.py

t chain_prewait ${CHAIN_S:-150} python3 benchmarks/kernels/decode_chain.py --out "$OUT" \
  --sections prewait
grep "^prewait" "$OUT/chain_prewait.txt" 2>/dev/null  # prewait-error: a setting that failed

# The chain's fastest setting of each dtype (its printed lines: the JSON is written only when
# the section ends), unless PRE_FP8 / PRE_BF16 say; "2+s" / "2" when the chain did not run.
best() { python3 - "$OUT/chain_prewait.txt" "$1" "$2" <<'EOF'
import json, sys
path, dtype, fallback = sys.argv[1:]
runs = {}
try:
    for line in open(path):
        p = line.split(" ", 3)
        if len(p) == 4 and p[0] == "prewait" and p[1] == dtype and not p[2].startswith("gemv"):
            r = json.loads(p[3])
            if r.get("bitwise"):
                runs[p[2]] = r["ms"]
except (OSError, ValueError):
    pass
runs = {k: v for k, v in runs.items() if k not in ("0", "0-again")}
print(min(runs, key=runs.get) if runs else fallback)
EOF
}
PRE_FP8=${PRE_FP8:-$(best fp8 2+s)}
PRE_BF16=${PRE_BF16:-$(best bf16 2)}
echo "engine settings: fp8 $PRE_FP8, bf16 $PRE_BF16" | tee -a "$OUT/device.txt"

b1() { local name=$1 secs=$2; shift 2
       if [ "$SECONDS" -gt "${DEADLINE:-400}" ]; then echo "=== $name skipped (${SECONDS} s > DEADLINE)"; return; fi
       t "$name" "$secs" "$@" --output-json "$OUT/$name.json"; }
F8="env TESSELLM_FP8_LM_HEAD=1"
b1 b1_fp8_off ${B1_FIRST_S:-100} $F8 TESSELLM_GEMV_PREWAIT=0 $LAT --quantization fp8
b1 b1_fp8_on ${B1_S:-50} $F8 TESSELLM_GEMV_PREWAIT=$PRE_FP8 $LAT --quantization fp8
b1 b1_bf16_off ${B1_S:-50} env TESSELLM_GEMV_PREWAIT=0 $LAT
b1 b1_bf16_on ${B1_S:-50} env TESSELLM_GEMV_PREWAIT=$PRE_BF16 $LAT
b1 b1_fp8_off_again ${B1_S:-50} $F8 TESSELLM_GEMV_PREWAIT=0 $LAT --quantization fp8
b1 b1_bf16_off_again ${B1_S:-50} env TESSELLM_GEMV_PREWAIT=0 $LAT

python3 - "$OUT" "$PRE_FP8" "$PRE_BF16" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out, pre_fp8, pre_bf16 = sys.argv[1:]
dev = open(os.path.join(out, "device.txt")).readline().strip()
print(f"SUMMARY device {dev}")
chain = os.path.join(out, "chain_prewait.txt")
for line in open(chain) if os.path.exists(chain) else ():
    if line.startswith("prewait-error"):
        print("SUMMARY chain FAILED " + line[len("prewait-error "):].strip())
for name in ("tests", "tests_parity"):
    p = os.path.join(out, name + ".txt")
    if os.path.exists(p):
        lines = [l.strip() for l in open(p) if " passed" in l or " failed" in l or "error" in l]
        print(f"SUMMARY {name}: {lines[-1] if lines else 'no pytest summary (timed out?)'}")
runs = {}
for line in open(chain) if os.path.exists(chain) else ():
    p = line.split(" ", 3)
    if len(p) == 4 and p[0] == "prewait":
        runs.setdefault(p[1], {})[p[2]] = json.loads(p[3])
for dtype, r in runs.items():
    base = r.get("0", {}).get("ms")
    gbase = r.get("gemv-0", {}).get("ms")
    for key, v in r.items():
        b = gbase if key.startswith("gemv") else base
        rel = f" ({100 * (v['ms'] / b - 1):+.2f}% vs off)" if b else ""
        bit = "" if "bitwise" not in v else ("  bitwise = off" if v["bitwise"] else "  NOT BITWISE")
        print(f"SUMMARY chain {dtype} prewait={key}: {v['ms']:.4f} ms/token{rel}{bit}")
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
for dtype, pre in (("fp8", pre_fp8), ("bf16", pre_bf16)):
    base = load(f"b1_{dtype}_off")
    for name, what in ((f"b1_{dtype}_off", "off"), (f"b1_{dtype}_on", pre),
                       (f"b1_{dtype}_off_again", "off again")):
        d = load(name)
        if d is None:
            print(f"SUMMARY engine B1 {dtype} prewait={what}: not run / failed ({name}.txt)")
            continue
        rel = (f" ({100 * (d['tpot_ms_median'] / base['tpot_ms_median'] - 1):+.2f}% vs off)"
               if base else "")
        head = ", fp8 LM head" if dtype == "fp8" else ""
        print(f"SUMMARY engine B1 {dtype}{head} prewait={what}: {d['tpot_ms_median']:.3f} "
              f"ms/token{rel}, TTFT {d['ttft_ms_median']:.1f} ms")
EOF
