#!/usr/bin/env bash
# Tensor/pipeline parallel runs on one multi-GPU host (../shared/BENCHMARKS.md shapes, dummy bf16).
# RUNS picks what to run, in order: tests allreduce b1-8b b1-8b-unfused f-8b b1-70b f-70b.
# Results land in $OUT. b1-8b-unfused: TP>1 with all-reduce and RMSNorm as two kernels (A/B).
# If the GPU tests fail with the symmetric-memory all-reduce, the rest runs on NCCL alone.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
NGPU=$(nvidia-smi -L | wc -l)
L8=benchmarks/model-configs/llama-3.1-8b
L70=benchmarks/model-configs/llama-3.1-70b
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
step() { echo "=== $1"; shift; /usr/bin/time -f "(%e s)" "$@" > "$OUT/log.txt" 2>&1; local rc=$?; tail -${TAIL:-8} "$OUT/log.txt"; return $rc; }
F="--num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096"
TPS="1 2 4"; [ "$NGPU" -lt 4 ] && TPS="1 2"
for r in ${RUNS:-tests allreduce b1-8b f-8b}; do
  case $r in
    tests) TAIL=15 step tests timeout -k 5 300 python3 -m pytest -q -x -p no:cacheprovider tests/distributed/test_cuda_parallel.py \
             || { echo "!!! GPU tests failed: TESSELLM_SYMM_MEM=0 from here"; export TESSELLM_SYMM_MEM=0; } ;;
    allreduce) TAIL=40 step "all-reduce x$NGPU" python3 benchmarks/allreduce_bench.py --world-size $NGPU --output-json $OUT/allreduce_x$NGPU.json ;;
    b1-8b) for t in $TPS; do step "B1 8B TP=$t" $B latency --model $L8 --load-format dummy --max-model-len 4096 --num-iters 3 -tp $t --output-json $OUT/b1_8b_tp$t.json; done ;;
    b1-8b-unfused) for t in $TPS; do [ $t -gt 1 ] && TESSELLM_FUSED_AR_NORM=0 step "B1 8B TP=$t unfused" $B latency --model $L8 --load-format dummy --max-model-len 4096 --num-iters 3 -tp $t --output-json $OUT/b1_8b_tp${t}_unfused.json; done ;;
    f-8b) for cfg in "2 1" "1 2" "1 1"; do set -- $cfg
            step "F 8B TP=$1 PP=$2" $B throughput --model $L8 --load-format dummy $F -tp $1 -pp $2 --output-json $OUT/f_8b_tp$1_pp$2.json; done ;;
    b1-70b) for t in 2 4; do [ $t -le $NGPU ] && step "B1 70B TP=$t" $B latency --model $L70 --load-format dummy --max-model-len 4096 --num-iters 3 -tp $t --output-json $OUT/b1_70b_tp$t.json; done ;;
    f-70b) for t in 2 4; do [ $t -le $NGPU ] && step "F 70B TP=$t" $B throughput --model $L70 --load-format dummy $F -tp $t --output-json $OUT/f_70b_tp$t.json; done ;;
  esac
done
