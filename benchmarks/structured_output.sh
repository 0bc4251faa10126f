#!/usr/bin/env bash
# Structured output on one GPU (docs/structured_output.md): F with a JSON schema on every
# request vs unconstrained F in the same run; per-step mask fill / apply cost; compile time of a
# large schema; also F-JSON without deferred masks (the old way) unless SO_BEFORE=0. Run from the
# repo root: `bash benchmarks/structured_output.sh`; results in $OUT/structured_output.json.
# Time box: SO_S seconds for the Python part (default 220; three 8B loads + runs take ~150 s on
# an H200).
# Needs xgrammar and its deps (not in the device image): pip install --no-deps
#   xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 (cp312 manylinux x86_64 wheels), plus pydantic,
#   pydantic-core, annotated-types, typing-inspection if the image lacks pydantic.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import xgrammar" || { echo "xgrammar is missing: see the header of this script"; exit 3; }
timeout 60 python3 -m pytest -q -x tests/kernels/test_bitmask.py tests/structured_output/test_apply.py 2>&1 | tail -3
BEFORE=(); [ "${SO_BEFORE:-1}" = 1 ] && BEFORE=(--before)
timeout "${SO_S:-220}" python3 benchmarks/structured_output.py --output-json "$OUT/structured_output.json" \
  "${BEFORE[@]}" "$@" 2>&1 | grep -v "Warning: The num_threads" | tail -60
