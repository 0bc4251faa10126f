#!/usr/bin/env bash
# Structured output on one GPU (docs/structured_output.md): F with a JSON schema on every
# request vs unconstrained F in the same run; per-step mask fill / apply cost; compile time of a
# large schema. Run from the repo root: `bash benchmarks/structured_output.sh`; results in $OUT.
# Needs xgrammar and its deps (not in the device image): pip install --no-deps
#   xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 (cp312 manylinux x86_64 wheels), plus pydantic,
#   pydantic-core, annotated-types, typing-inspection if the image lacks pydantic.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import xgrammar" || { echo "xgrammar is missing: see the header of this script"; exit 3; }
python3 -m pytest -q -x tests/kernels/test_bitmask.py 2>&1 | tail -3
python3 benchmarks/structured_output.py --output-json "$OUT/structured_output.json" "$@" 2>&1 | tail -40
