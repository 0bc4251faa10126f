#!/usr/bin/env bash
# One device-machine session for quantization: the tests on the GPU, B1/F-style engine runs
# (bf16, fp8, int8 with Llama-3.1-8B shapes; F twice, cold then warm), the GEMM micro-benchmark,
# the fp8 kernel choices (fp8_kernels.py), then fp8 + fp8 KV.
# Each stage is time-boxed so that a short session still returns everything finished; results
# land in $OUT (speed.json is rewritten after every measurement).
# Run from the repo root, carrying tessellm.egg-info (the entry points):
#   python -c "import setuptools; setuptools.setup()" egg_info
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
BUDGET=${BUDGET:-335}  # seconds for the whole script
T0=$(date +%s)
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
S="python3 benchmarks/quantization/speed.py --out $OUT/speed.json"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/device.txt"
echo "=== tests"
timeout ${TEST_S:-120} python3 -m pytest -q tests/quantization -p no:cacheprovider -rfs 2>&1 \
  | tail -40 | tee "$OUT/tests.txt"
echo "=== engine ($(left) s left)"
timeout $(( $(left) - 50 )) $S --engine --configs bf16 fp8 int8 --deadline $(( $(left) - 110 )) 2>&1 \
  | grep -v Warning | tail -20
echo "=== gemm ($(left) s left)"
timeout $(( $(left) > 45 ? 40 : $(left) - 5 )) $S --gemm --m 1 16 256 2048 2>&1 | tail -20
echo "=== fp8 kernels ($(left) s left)"
timeout $(( $(left) > 70 ? 60 : $(left) - 10 )) python3 benchmarks/quantization/fp8_kernels.py --attention \
  --gemm --sweep-max-m 0 --out "$OUT/fp8_kernels.json" 2>&1 | grep -v Warning | tail -14
echo "=== fp8 + fp8 KV ($(left) s left)"
[ "$(left)" -gt 40 ] && timeout $(( $(left) - 3 )) $S --engine --configs fp8+kv_fp8 --workloads B1 F \
  --deadline $(( $(left) - 30 )) 2>&1 | grep -v Warning | tail -5
echo "=== done in $(( $(date +%s) - T0 )) s"
