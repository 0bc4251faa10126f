#!/usr/bin/env bash
# Issue 22, B1 fp8 (session 17, b1fp8): two opt-in paths, timed before/after in one run.
#   TESSELLM_FP8_LM_HEAD=1      the LM head of a quantization="fp8" model in e4m3 too (per-row
#                               scales): decode reads 0.53 GB less a token on Llama-3.1-8B
#   TESSELLM_ATTN_LAST_REDUCE=1 the batch-1 decode attention's last-finishing split combines
#                               the partials itself: no reduce launch (32 launches a token less)
# Both are off by default; "before" runs with both =0, "after" with both =1.
#
#   bash benchmarks/b1fp8_device.sh          # from the repo root; ~7 min on a warm H100/H200
#
# Parts (each time-boxed with device_env.sh's t helper; SECONDS 0 skips one):
#   1. GPU tests (TESTS_S 150): the last-split reduce against the reduce kernel and the
#      reference, its sm_90 compile; the decode-latency tests beside it; the fp8 LM head
#      through the cuda engine against a float64 oracle; fp32 greedy parity with HF on cuda
#      with the reduce on (tests/models/test_cuda_parity.py).
#   2. B1 (bench latency: Llama-3.1-8B shapes, dummy weights, 512-token prompt, 256 greedy
#      tokens, 3 iterations; B1_S 60 each): fp8 before, fp8 after, bf16 before, bf16 after
#      (the reduce only: bf16 has no fp8 head), fp8 head only, fp8 reduce only, fp8 before
#      again (the run-to-run spread).
#   3. A summary table (ms/token, TTFT, change against the first fp8 / bf16 run).
# Output: $OUT (default /tmp/tessellm-out): b1_*.json, the tests' logs, summary.txt.
set -u
. benchmarks/device_env.sh
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
OFF="env TESSELLM_FP8_LM_HEAD=0 TESSELLM_ATTN_LAST_REDUCE=0"
ON="env TESSELLM_FP8_LM_HEAD=1 TESSELLM_ATTN_LAST_REDUCE=1"
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo "${COMMIT:-unknown}")"; date -u
} | tee "$OUT/device.txt"

PYT="python3 -m pytest -q -p no:cacheprovider -x"
t tests_kernels ${TESTS_S:-150} $PYT tests/kernels/test_decode_last_reduce.py \
  tests/kernels/test_decode_latency.py tests/quantization/test_fp8_lm_head.py
t tests_parity_last_reduce ${PARITY_S:-120} env TESSELLM_ATTN_LAST_REDUCE=1 $PYT \
  tests/models/test_cuda_parity.py

b1() { local name=$1; shift; t "$name" ${B1_S:-60} "$@" --output-json "$OUT/$name.json"; }
b1 b1_fp8_before $OFF $LAT --quantization fp8
b1 b1_fp8_after $ON $LAT --quantization fp8
b1 b1_bf16_before $OFF $LAT
b1 b1_bf16_after $ON $LAT
b1 b1_fp8_head_only env TESSELLM_FP8_LM_HEAD=1 TESSELLM_ATTN_LAST_REDUCE=0 $LAT --quantization fp8
b1 b1_fp8_reduce_only env TESSELLM_FP8_LM_HEAD=0 TESSELLM_ATTN_LAST_REDUCE=1 $LAT --quantization fp8
b1 b1_fp8_before_again $OFF $LAT --quantization fp8

python3 - "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, os, sys
out = sys.argv[1]
rows = [("b1_fp8_before", "fp8, both off (before)", "b1_fp8_before"),
        ("b1_fp8_after", "fp8, fp8 LM head + last-split reduce (after)", "b1_fp8_before"),
        ("b1_fp8_head_only", "fp8, fp8 LM head only", "b1_fp8_before"),
        ("b1_fp8_reduce_only", "fp8, last-split reduce only", "b1_fp8_before"),
        ("b1_fp8_before_again", "fp8, both off, again (spread)", "b1_fp8_before"),
        ("b1_bf16_before", "bf16, reduce off (before)", "b1_bf16_before"),
        ("b1_bf16_after", "bf16, last-split reduce (after)", "b1_bf16_before")]
def load(name):
    p = os.path.join(out, name + ".json")
    return json.load(open(p)) if os.path.exists(p) else None
print("| run | ms/token | TTFT ms | vs before | goal |")
print("|---|---|---|---|---|")
for name, what, base in rows:
    d, b = load(name), load(base)
    if d is None:
        print(f"| {what} | not run / failed (see {name}.txt) | | | |")
        continue
    tpot, ttft = d["tpot_ms_median"], d["ttft_ms_median"]
    rel = f"{100 * (tpot / b['tpot_ms_median'] - 1):+.2f}%" if b else ""
    goal = "2.2 (fp8)" if "fp8" in name else "3.95 (bf16)"
    print(f"| {what} | {tpot:.3f} | {ttft:.1f} | {rel} | {goal} |")
EOF
