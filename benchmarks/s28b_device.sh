#!/usr/bin/env bash
# Session 28, call 2 (one GPU, <= 9 min): the bitsandbytes 4-bit decode GEMV swept
# (bench_bnb4_sweep.py: prints GEMV_CONFIGS / GEMV_MAX_M to set in kernels/gemm/bnb4.py), the
# bnb gpu tests (the GEMV kernel tests call it directly, at 1-6 rows), bench_bnb4.py as the
# engine runs it, and the ZmqPeer io parts of deadmount_device.sh (needs the bitsandbytes wheel in .whl-bnb/, carried).
source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/s28b-triton
nvidia-smi --query-gpu=name --format=csv,noheader
t sweep ${SWEEP_S:-260} python3 benchmarks/kernels/bench_bnb4_sweep.py --json $OUT/sweep.json
tail -${SWEEP_TAIL:-40} $OUT/sweep.txt
t bnbgpu ${BNB_S:-90} python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/quantization/test_bnb.py
t bnbbench ${BENCH_S:-80} python3 benchmarks/kernels/bench_bnb4.py --json $OUT/bnb4.json
tail -30 $OUT/bnbbench.txt
t io ${IO_S:-50} python3 benchmarks/kvpeer_io.py 1024 --device cuda
grep -E "GB/s|blocks of|idle" "$OUT/io.txt"
t io-window ${IO_S:-50} env KV_AHEAD=default python3 benchmarks/kvpeer_io.py 1024 --device cuda
grep -E "GB/s|idle" "$OUT/io-window.txt"
