#!/usr/bin/env bash
# Workload S on a GPU machine: a real `tessellm serve` (Llama-3.1-8B shapes, dummy bf16) and
# `tessellm bench serve` at 4, 16 and unbounded req/s (500 requests, 512 in / 128 out each).
# Missing server packages travel as wheels in .whl/ (see the device README); results in $OUT.
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
PORT=${PORT:-8011}
python3 -m tessellm.entrypoints.cli --log-level WARNING serve ${MODEL:-benchmarks/model-configs/llama-3.1-8b} \
  --load-format dummy --max-model-len ${MAX_LEN:-4096} --port $PORT --served-model-name llama8b > "$OUT/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 180); do
  curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { echo "server died"; tail -30 "$OUT/server.log"; exit 1; }
  sleep 2
done
for rate in ${RATES:-4 16 inf}; do
  echo "=== S rate=$rate"
  python3 -m tessellm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT" --model llama8b \
    --num-prompts ${NUM_PROMPTS:-500} --input-len 512 --output-len 128 --request-rate $rate \
    --output-json "$OUT/s_$rate.json" 2>&1 | tail -${TAIL:-30}
done
kill $SERVER; wait $SERVER 2>/dev/null
