#!/usr/bin/env bash
# Tensor/pipeline parallel runs on one multi-GPU host (../shared/BENCHMARKS.md shapes, dummy bf16).
# RUNS picks what to run: tests b1-8b f-8b b1-70b f-70b. Results land in $OUT.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
NGPU=$(nvidia-smi -L | wc -l)
L8=benchmarks/model-configs/llama-3.1-8b
L70=benchmarks/model-configs/llama-3.1-70b
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
step() { echo "=== $1"; shift; /usr/bin/time -f "(%e s)" "$@" 2>&1 | tail -${TAIL:-8}; }
TPS="1 2 4"; [ "$NGPU" -lt 4 ] && TPS="1 2"
for r in ${RUNS:-tests b1-8b f-8b}; do
  case $r in
    tests) TAIL=6 step tests python3 -m pytest -q -x -p no:cacheprovider tests/distributed/test_cuda_parallel.py ;;
    b1-8b) for t in $TPS; do step "B1 8B TP=$t" $B latency --model $L8 --load-format dummy --max-model-len 4096 --num-iters 3 -tp $t --output-json $OUT/b1_8b_tp$t.json; done ;;
    f-8b) for cfg in "2 1" "1 2"; do set -- $cfg
            step "F 8B TP=$1 PP=$2" $B throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 -tp $1 -pp $2 --output-json $OUT/f_8b_tp$1_pp$2.json; done ;;
    b1-70b) for t in 2 4; do [ $t -le $NGPU ] && step "B1 70B TP=$t" $B latency --model $L70 --load-format dummy --max-model-len 4096 --num-iters 3 -tp $t --output-json $OUT/b1_70b_tp$t.json; done ;;
    f-70b) for t in 2 4; do [ $t -le $NGPU ] && step "F 70B TP=$t" $B throughput --model $L70 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 -tp $t --output-json $OUT/f_70b_tp$t.json; done ;;
  esac
done
