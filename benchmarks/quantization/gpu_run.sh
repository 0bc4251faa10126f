#!/usr/bin/env bash
# One device-machine session for quantization: the tests on the GPU, the GEMM micro-benchmark,
# then B1/F-style engine runs (bf16, fp8, int8, fp8 + fp8 KV) with Llama-3.1-8B shapes.
# Each stage has a time box so that a short session still returns everything finished.
# Run from the repo root, carrying tessellm.egg-info (the entry points):
#   python -c "import setuptools; setuptools.setup()" egg_info
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-330}  # seconds for the whole script
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
echo "=== tests"
timeout ${TEST_S:-125} python3 -m pytest -q tests/quantization -p no:cacheprovider -rfs 2>&1 \
  | tail -40 | tee "$OUT/tests.txt"
echo "=== gemm ($(left) s left)"
timeout ${GEMM_S:-45} python3 benchmarks/quantization/speed.py --gemm --m 1 16 256 2048 \
  --out "$OUT/speed.json" 2>&1 | tail -30
echo "=== engine ($(left) s left)"
timeout $(( $(left) - 5 )) python3 benchmarks/quantization/speed.py --engine \
  --configs ${CONFIGS:-bf16 fp8 int8 fp8+kv_fp8} --deadline $(( $(left) - 60 )) \
  --out "$OUT/speed.json" 2>&1 | grep -v Warning | tail -30
echo "=== done in $(( $(date +%s) - T0 )) s"
