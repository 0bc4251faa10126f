#!/usr/bin/env bash
# Session 29 (one GPU, <= 9 min): the bitsandbytes 4-bit decode GEMV's variants (gemm/bnb4.py:
# table lookups t16 / pair / gather, x as words, 16-byte code loads, the in-launch split sum)
# checked against the dequantized reference then swept at the Llama-8B shapes, 1 and 2 rows,
# L2 flushed (bench_bnb4_sweep.py --check: prints GEMV_CONFIGS / GEMV_MAX_M to set in bnb4.py,
# everything in $OUT/sweep.json), then the GEMV's GPU tests (every variant, the default table).
source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET
export TRITON_CACHE_DIR=/tmp/s29-bnbgemv2-triton
nvidia-smi --query-gpu=name --format=csv,noheader
t sweep ${SWEEP_S:-420} python3 benchmarks/kernels/bench_bnb4_sweep.py --check --json $OUT/sweep.json
grep -E "check:|FAILED" $OUT/sweep.txt
tail -${SWEEP_TAIL:-40} $OUT/sweep.txt
t bnbgpu ${BNB_S:-120} python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/quantization/test_bnb.py -k "gemv or dequantize or pair_table or takes"
