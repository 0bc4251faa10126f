#!/usr/bin/env bash
# Structured output on one GPU (docs/structured_output.md): F; F with a JSON schema on every
# request (an object of 64 required integers); the same with the array of >= 300 integers used
# before; F again; F-JSON the way before (mask filled on the loop, copied to pinned memory): all
# on one engine in one run, each with its own prompts; per-step host time of the loop's parts;
# mask fill / upload / apply cost per step; compile time of a large schema. Run from the repo
# root: `bash benchmarks/structured_output.sh`; results in $OUT/structured_output.json.
# Time box: SO_S seconds for the Python part (default 150: one 8B load, a warm-up and five F
# runs take ~90 s on an H200). SO_F_RUNS=4: all but the way before. SO_TESTS="": no GPU tests.
# Needs xgrammar and its deps (not in the device image): pip install --no-deps
#   xgrammar==0.2.9 apache-tvm-ffi==0.1.15.post2 (cp312 manylinux x86_64 wheels), plus pydantic,
#   pydantic-core, annotated-types, typing-inspection if the image lacks pydantic.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}.
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/device.txt"
python3 -c "import xgrammar" || { echo "xgrammar is missing: see the header of this script"; exit 3; }
TESTS=${SO_TESTS-tests/kernels/test_bitmask.py tests/structured_output/test_apply.py}
# shellcheck disable=SC2086
[ -n "$TESTS" ] && timeout 60 python3 -m pytest -q -x -p no:cacheprovider $TESTS 2>&1 | tail -3
timeout "${SO_S:-150}" python3 benchmarks/structured_output.py --output-json "$OUT/structured_output.json" \
  --f-runs "${SO_F_RUNS:-5}" "$@" 2>&1 | grep -v "Warning: The num_threads" | tail -60
