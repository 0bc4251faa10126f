#!/usr/bin/env bash
# Issue 22, B1 fp8 (session 20, gemv8): the one-row GEMVs with split K combined in the launch
# (TESSELLM_GEMV_SPLIT_LAST, tessellm/kernels/gemm/split_last.py: each N tile's last program
# adds the K ranges' float32 planes in a fixed order; no sum/cast launches), old vs new in one
# call. Off by default; "new" = TESSELLM_GEMV_SPLIT_LAST=1 with the SPLIT_TABLE /
# BF16_SPLIT_TABLE that part 2 measures and writes (into this tree's copy and $OUT), and
# PREWAIT_TILES as shipped (o: 2 weight tiles before its PDL wait; the sweep keeps it). Where no
# split wins a shape, "new" differs from "old" there only by PREWAIT_TILES.
#
#   bash benchmarks/gemv8_device.sh          # from the repo root; parts 1-3 ~5-6 min on a warm
#                                            # H200/H100, then the engine runs while under DEADLINE
#   PART=2 bash benchmarks/gemv8_device.sh   # the engine runs alone (~4 min), on the same warm
#                                            # machine after a first call: they take the table
#                                            # that call measured (kept in /tmp/gemv8_table.py)
#
# Parts (each time-boxed with device_env.sh's t helper; SECONDS 0 skips one):
#   1. GPU tests (TESTS_S 100): tests/kernels/test_gemv_split_last.py (bitwise the planes
#      added in order, twice, in a CUDA graph replayed twice, sm_90 compile), the x2 / fp8
#      cases of test_gemv.py, test_gemv_prewait.py, test_gemv_silu.py; CONF_S 50: cuda
#      conformance -k "quant or fused_ops" with the flag on; PARITY_S 0 (skipped): fp32
#      greedy parity with HF on cuda with the flag on (tests/models/test_cuda_parity.py).
#   2. Per-shape sweep (x2_sweep.py --quick --bf16 --write-table, SWEEP_S 180): qkv, o,
#      gate_up, down at one row, e4m3 x2 old launches (default, tiled tiles, two streamed)
#      against split ones (4-tuples), then the bf16 FMA kernel default vs split (qkv, o); 1.5 GB of
#      weight copies a shape in one graph with PDL, alone and (qkv, o, gate_up) each call after
#      the add-RMSNorm kernel, as the chain runs them (those rank by that pair's time);
#      "x2-summary" / "bf16-summary" lines (us, TB/s of old default, best old, best split);
#      then qkv+o+gate_up+down of 8 layers default vs tuned vs split ("layers"). Winners by
#      >= 3% go into gemv_x2_table.py.
#   3. The B1 kernel chain (decode_chain.py --sections splitlast, CHAIN_S 130): 32 layers + LM
#      head in one CUDA graph with PDL, engine form (SiLU fold, fp8 with its e4m3 LM head),
#      flag off / on / on-split (without PREWAIT_TILES: o reads 2 tiles before its PDL wait,
#      a guess) / on-prewait (without the split tables) / off again, then the GEMVs alone
#      off / on; fp8 then bf16.
#   4. Engine B1 (bench latency: Llama-3.1-8B shapes, dummy weights, 512-token prompt, 256
#      greedy tokens, 3 iterations; fp8 with TESSELLM_FP8_LM_HEAD=1 as b1pre_device.sh ran
#      it): fp8 old, fp8 new, bf16 old, bf16 new, fp8 old again (the spread). B1_FIRST_S 100,
#      B1_S 50; a run starts only if its limit ends before DEADLINE (570 s; PART=2:
#      parts 1-3 skipped, the table of the last PART 1 on this machine installed first).
#   5. SUMMARY lines on stdout (also $OUT/summary.txt).
# Output: $OUT (default /tmp/tessellm-out): device.txt, tests*.txt, sweep.txt, x2_sweep.json,
# gemv_x2_table.py (the measured table: commit it if the flag is flipped), chain.txt,
# splitlast.json, b1_*.json / .txt, summary.txt.
#
# Expected (not yet run; the design's arithmetic, benchmarks/README.md "Session 20 (gemv8)"):
#   SUMMARY tests: N passed (0 failed); conformance passed
#   x2-summary qkv | old default: ~8.0 us ~3.1 TB/s (alone) | best split: 7-8 us
#   x2-summary o   | old default: ~6.2 us ~2.7 TB/s (alone) | best split: 5-6.2 us
#     (after a norm: the pair's time, the norm's ~2 us included; prewait hides part of the
#     ramp there, so the split's gain, if any, is smaller than alone)
#     (H200 2026-12-04 old figures; a split wins a shape only by >= 3%, else the table stays
#     empty there and the flag changes nothing on it)
#   gate_up / down: no split expected to win (3.7-3.8 TB/s already)
#   SUMMARY chain fp8 on: -0% to -3% vs off (<= ~0.07 ms of ~2.35 on an H200); bf16 smaller;
#     on-prewait (o's 2 tiles) up to ~-2% (~1.5 us of o a layer), or slower (registers)
#   SUMMARY engine B1 fp8 new: the chain's change within the engine spread (~0.3%)
# Flip the default (envs.gemv_split_last) only if the engine fp8 "new" beats "old" and "old
# again" by more than their spread and bf16 is no slower; commit $OUT/gemv_x2_table.py with it.
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
if [ "${PART:-1}" = 2 ]; then
  TESTS_S=0 CONF_S=0 PARITY_S=0 SWEEP_S=0 CHAIN_S=0
  if [ -f /tmp/gemv8_table.py ]; then
    cp /tmp/gemv8_table.py tessellm/kernels/gemm/gemv_x2_table.py && echo "table: /tmp/gemv8_table.py"
  else
    echo "table: none measured on this machine, the tree's own"
  fi
  cp tessellm/kernels/gemm/gemv_x2_table.py "$OUT/gemv_x2_table.py"
fi
t tests ${TESTS_S:-100} $PYT tests/kernels/test_gemv_split_last.py tests/kernels/test_gemv_prewait.py \
  tests/kernels/test_gemv_silu.py tests/kernels/test_gemv.py -k "split_last or prewait or silu or x2 or fp8"
t conformance ${CONF_S:-50} env TESSELLM_GEMV_SPLIT_LAST=1 python3 -m tessellm.testing --backend cuda \
  -q -k "quant or fused_ops"
t tests_parity ${PARITY_S:-0} env TESSELLM_GEMV_SPLIT_LAST=1 $PYT -x tests/models/test_cuda_parity.py

t sweep ${SWEEP_S:-180} python3 benchmarks/kernels/x2_sweep.py --out "$OUT" --quick --bf16 --write-table
[ -f "$OUT/sweep.txt" ] && grep -E "summary|^layers|^table" "$OUT/sweep.txt"
[ "${SWEEP_S:-180}" -gt 0 ] && [ -f "$OUT/gemv_x2_table.py" ] && cp "$OUT/gemv_x2_table.py" /tmp/gemv8_table.py
echo "SPLIT_TABLE / BF16_SPLIT_TABLE in use:"; sed -n '/^SPLIT_TABLE/,$p' tessellm/kernels/gemm/gemv_x2_table.py

t chain ${CHAIN_S:-130} python3 benchmarks/kernels/decode_chain.py --out "$OUT" --sections splitlast
[ -f "$OUT/chain.txt" ] && grep "^splitlast" "$OUT/chain.txt"

b1() { local name=$1 secs=$2; shift 2
       if [ $((SECONDS + secs)) -gt "${DEADLINE:-570}" ]; then
         echo "=== $name skipped (${SECONDS} s + its ${secs} s limit > DEADLINE)"; return; fi
       t "$name" "$secs" "$@" --output-json "$OUT/$name.json"; }
F8="env TESSELLM_FP8_LM_HEAD=1"
b1 b1_fp8_old ${B1_FIRST_S:-100} $F8 TESSELLM_GEMV_SPLIT_LAST=0 $LAT --quantization fp8
b1 b1_fp8_new ${B1_S:-50} $F8 TESSELLM_GEMV_SPLIT_LAST=1 $LAT --quantization fp8
b1 b1_bf16_old ${B1_S:-50} env TESSELLM_GEMV_SPLIT_LAST=0 $LAT
b1 b1_bf16_new ${B1_S:-50} env TESSELLM_GEMV_SPLIT_LAST=1 $LAT
b1 b1_fp8_old_again ${B1_S:-50} $F8 TESSELLM_GEMV_SPLIT_LAST=0 $LAT --quantization fp8

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
dev = open(os.path.join(out, "device.txt")).readline().strip()
print(f"SUMMARY device {dev}")
p = os.path.join(out, "gemv_x2_table.py")
if os.path.exists(p):
    t = {}
    exec(open(p).read(), t)
    print(f"SUMMARY table SPLIT_TABLE {t['SPLIT_TABLE']} BF16_SPLIT_TABLE {t['BF16_SPLIT_TABLE']}")
for name in ("tests", "conformance", "tests_parity"):
    p = os.path.join(out, name + ".txt")
    if os.path.exists(p):
        lines = [l.strip() for l in open(p) if " passed" in l or " failed" in l or "error" in l]
        print(f"SUMMARY {name}: {lines[-1] if lines else 'no pytest summary (timed out?)'}")
p = os.path.join(out, "sweep.txt")
for line in open(p) if os.path.exists(p) else ():
    if "summary" in line or line.startswith(("layers", "table")):
        print("SUMMARY " + line.strip())
p = os.path.join(out, "chain.txt")
runs = {}
for line in open(p) if os.path.exists(p) else ():
    parts = line.split(" ", 3)
    if len(parts) == 4 and parts[0] == "splitlast":
        runs.setdefault(parts[1], {})[parts[2]] = json.loads(parts[3])["ms"]
    elif line.startswith("splitlast-error"):
        print("SUMMARY chain FAILED " + line[len("splitlast-error "):].strip())
for dtype, r in runs.items():
    for key, ms in r.items():
        base = r.get("gemv-off" if key.startswith("gemv") else "off")
        rel = f" ({100 * (ms / base - 1):+.2f}% vs off)" if base else ""
        print(f"SUMMARY chain {dtype} {key}: {ms:.4f} ms/token{rel}")
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
for dtype in ("fp8", "bf16"):
    base = load(f"b1_{dtype}_old")
    for what in ("old", "new", "old_again"):
        d = load(f"b1_{dtype}_{what}")
        if d is None:
            if what != "old_again" or dtype == "fp8":
                print(f"SUMMARY engine B1 {dtype} {what}: not run / failed (b1_{dtype}_{what}.txt)")
            continue
        rel = (f" ({100 * (d['tpot_ms_median'] / base['tpot_ms_median'] - 1):+.2f}% vs old)"
               if base else "")
        head = ", fp8 LM head" if dtype == "fp8" else ""
        print(f"SUMMARY engine B1 {dtype}{head} {what}: {d['tpot_ms_median']:.3f} ms/token{rel}, "
              f"TTFT {d['ttft_ms_median']:.1f} ms")
EOF
