#!/usr/bin/env bash
# Session 28, call 1 (one GPU, <= 10 min): custom logits processors on CUDA (graphs, async,
# overlap); the bitsandbytes 4-bit gpu tests and kernel timing (needs the bitsandbytes wheel in
# .whl-bnb/, carried); specprof (draft model at 0.90, the overlap part, the side-stream test).
source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name --format=csv,noheader; git rev-parse --short HEAD 2>/dev/null
t lpcuda 140 python3 -m pytest -q -p no:cacheprovider -rfE tests/sampling/test_logits_processors_cuda.py
t bnbgpu 110 python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/quantization/test_bnb.py
t bnbbench 70 python3 benchmarks/kernels/bench_bnb4.py --json $OUT/bnb4.json
tail -30 $OUT/bnbbench.txt
SKIP_WHL=1 D90_S=120 D95_S=0 OV_S=80 TEST_S=40 OUT=$OUT/specprof bash benchmarks/specprof_device.sh 2>&1 | tail -40
