#!/usr/bin/env bash
# Data parallelism on one host (-dp N), on a machine with 2 or more GPUs (nvidia-h100-x2; x4 also
# runs the -dp 2 -tp 2 case): the GPU tests (core r on its own devices, greedy tokens equal to one
# GPU, a too-large -dp refused), `bench throughput -dp 1|2` (offline), then `tessellm bench serve`
# against -dp 1 and -dp 2 servers
# (Llama-3.1-8B shapes, dummy bf16, NUM_PROMPTS (200) requests of 512 in / 128 out, all at once).
# Output in $OUT: dp_tests.txt, t_dp{1,2}.json, server_dp{1,2}.log, s_dp{1,2}.json; summaries on stdout.
# Run: OUT=/tmp/dp-out bash benchmarks/dp_device.sh (about 7 minutes on 2 H100s).
set -u
export PYTHONUNBUFFERED=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH; t / box
nvidia-smi -L
t dp_tests 240 python3 -m pytest -q -p no:cacheprovider -m gpu tests/distributed/test_data_parallel.py -k cuda -rs
for dp in ${DPS:-1 2}; do  # offline: LLM(data_parallel_size=dp), the workload run once to warm up
  box "bench throughput -dp $dp" 150 $B throughput --model ${MODEL:-$L8} --load-format dummy \
    --max-model-len ${MAX_LEN:-2048} -dp $dp --num-prompts ${NUM_PROMPTS:-200} --input-len 512 \
    --output-len 128 --output-json "$OUT/t_dp$dp.json"
done
PORT=${PORT:-8012}
for dp in ${DPS:-1 2}; do
  echo "=== serve -dp $dp $(date -u +%T)"
  python3 -m tessellm.entrypoints.cli --log-level WARNING serve ${MODEL:-$L8} --load-format dummy \
    --max-model-len ${MAX_LEN:-2048} --port $PORT --served-model-name llama8b -dp $dp \
    > "$OUT/server_dp$dp.log" 2>&1 &
  SERVER=$!
  ok=0
  for _ in $(seq 1 150); do
    curl -sf "http://127.0.0.1:$PORT/ready" >/dev/null && { ok=1; break; }
    kill -0 $SERVER 2>/dev/null || break
    sleep 2
  done
  if [ $ok = 1 ]; then
    curl -s "http://127.0.0.1:$PORT/debug/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print('engines', [(e['index'], e['devices']) for e in d['engines']])"
    timeout 300 python3 -m tessellm.entrypoints.cli bench serve --base-url "http://127.0.0.1:$PORT" --model llama8b \
      --num-prompts ${NUM_PROMPTS:-200} --input-len 512 --output-len 128 --request-rate inf \
      --output-json "$OUT/s_dp$dp.json" 2>&1 | grep -v -i warn | tail -${TAIL:-12}
    curl -s "http://127.0.0.1:$PORT/debug/stats" | python3 -c "import json,sys; d=json.load(sys.stdin); print('requests sent per core', [e['requests_sent_total'] for e in d['engines']])"
  else
    echo "server -dp $dp not ready"; tail -30 "$OUT/server_dp$dp.log"
  fi
  kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null
done
