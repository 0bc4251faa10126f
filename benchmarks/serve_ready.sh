#!/usr/bin/env bash
# Ready means warm (issue 17), on one GPU: a FRESH `tessellm serve` (Llama-3.1-8B shapes, dummy
# bf16) per run, timed from start to /ready, then workload S's first 500 requests (512 in / 128
# out, Poisson) at 4 and 16 req/s, then the Triton compilations it made after /ready (goal: 0;
# `tessellm:triton_compilations_after_ready` in /metrics).
#
#   run 1: empty TRITON_CACHE_DIR, rate 4     (a brand-new node)
#   run 2: warm  TRITON_CACHE_DIR, rate 16    (a restart / autoscaled replica with the cache volume)
#   run 3: warm  TRITON_CACHE_DIR, rate 4
#   PASSES=2: each fresh server serves the workload twice (other prompts); pass 1 cold, pass 2 warm
#
# Server packages the device image lacks travel as wheels in .whl/ (benchmarks/README.md lists
# them). Results: $OUT/ready_<run>.json (bench serve JSON with a "server" section) and a summary.
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
PORT=${PORT:-8011}
MODEL=${MODEL:-benchmarks/model-configs/llama-3.1-8b}
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/tessellm-triton-cache}
rm -rf "$TRITON_CACHE_DIR"; mkdir -p "$TRITON_CACHE_DIR"

run() {  # name rate
  echo "=== $1: TRITON_CACHE_DIR $(find "$TRITON_CACHE_DIR" -type f | wc -l) files, rate $2"
  python3 -m tessellm.entrypoints.cli --log-level WARNING bench serve --launch --model "$MODEL" \
    --load-format dummy --max-model-len ${MAX_LEN:-4096} --base-url "http://127.0.0.1:$PORT" \
    --num-prompts ${NUM_PROMPTS:-500} --input-len 512 --output-len 128 --request-rate "$2" \
    --passes ${PASSES:-1} --output-json "$OUT/ready_$1.json" > "$OUT/ready_$1.log" 2>&1
  echo "exit $?"; grep -E "ready after|P99 TTFT|P50 TTFT|Pass |Successful|Failed|time to" "$OUT/ready_$1.log"
  grep -E "Warm-up|Triton compiled" "$OUT/ready_$1.log" | head -5
}
for spec in ${RUNS:-cold4:4 warm16:16 warm4:4}; do run "${spec%%:*}" "${spec##*:}"; done

python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "ready_*.json"))):
    r = json.load(open(path))
    s = r.get("server", {})
    rows.append((os.path.basename(path)[6:-5], s.get("time_to_ready_s"), r["request_rate"], r["completed"],
                 r["failed"], r["ttft_ms"]["p50"], r["ttft_ms"]["p99"], s.get("triton_compilations_after_ready")))
print(f"{'run':<8}{'ready_s':>9}{'rate':>6}{'ok':>5}{'fail':>5}{'ttft_p50':>10}{'ttft_p99':>10}{'compiles_after_ready':>22}")
for row in rows:
    print("".join(f"{v!s:>{w}}" for v, w in zip(row, (8, 9, 6, 5, 5, 10, 10, 22))).replace(row[0].rjust(8), row[0].ljust(8), 1))
json.dump(rows, open(os.path.join(sys.argv[1], "ready_summary.json"), "w"), indent=1)
PY
