#!/usr/bin/env bash
# The test suite's GPU set on ONE GPU (~8 min): the part of tests/ most likely to break on a GPU
# machine, Triton kernels compiled for the device (TRITON_INTERPRET unset; tests/conftest.py
# leaves it unset where a GPU is visible). The same set as ci/matrix.yaml's cuda lane:
#   conformance  python -m tessellm.testing --backend cuda (the plugin contract on the device)
#   kernels      tests/kernels + tests/backends, not slow: kernel tests on cuda tensors, the
#                backends' registry / report / conformance tests (pytest-xdist -n $XDIST_N
#                where the image has it, --dist loadfile; else one process)
#   gpu          every gpu-marked test in tests/ (one process: each test's engine sizes its
#                KV cache from the free device memory, so no two run at once; tests that need
#                2+ GPUs skip)
#   pinned       a sample of the CPU suite with the GPU visible (tests/models/test_parity.py,
#                test_generation_config, test_bad_input): its engines' device="auto" must
#                resolve to the cpu backend (tests/conftest.py), greedy parity with HF as on CI
# Every test runs to the end (no -x); a part cut off by its limit still reports what finished.
# Each part's outcomes: $OUT/<part>.outcomes (benchmarks/pytest_outcomes.py: outcome, node id,
# the error's last line), its whole output $OUT/<part>.txt; the end prints per part the counts
# and each failure's name and error, and rc=1 if anything failed.
#   bash benchmarks/gputests_device.sh   (repo root; carry .whl and tessellm.egg-info as usual)
# Knobs: CONF_S / KERNELS_S / GPU_S / PINNED_S (part limits, seconds; 0 skips a part), XDIST_N (workers,
# default 8), PYTEST_ARGS (extra pytest arguments for the kernels and gpu parts, e.g. "-k moe").
# Read it so: "failed"/"error" lines name tests that break on a GPU; skipped are expected
# (multi-GPU tests, tests that need TRITON_INTERPRET=1: @pytest.mark.interpreted). A part that
# hits its limit shows rc=124 and the counts of what finished before it.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
source benchmarks/device_env.sh
unset TRITON_INTERPRET
# The example plugin (tests/backends/test_example_plugin.py) installed beside the wheels, from a
# copy (its build files stay out of the tree); where that fails, the test's fixture tries pip.
rm -rf /tmp/gputests-example /tmp/gputests-site && cp -r examples/tessellm-plugin-example /tmp/gputests-example &&
  python3 -m pip install -q --no-deps --no-build-isolation --no-index --target /tmp/gputests-site \
    /tmp/gputests-example > /dev/null 2>&1 && export PYTHONPATH=/tmp/gputests-site:$PYTHONPATH
export PYTHONPATH=$PYTHONPATH:$PWD/benchmarks  # the outcomes plugin
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-/tmp/gputests-triton}
# --continue-on-collection-errors: a test module that cannot import here (a package the image
# lacks) is listed, not the end of the part
P="python3 -m pytest -q -p no:cacheprovider -p pytest_outcomes -rfE --continue-on-collection-errors"
if python3 -c "import pytest_timeout" 2>/dev/null; then P="$P --timeout=${TEST_TIMEOUT_S:-180}"; fi
if python3 -c "import xdist" 2>/dev/null; then
  XDIST="-n ${XDIST_N:-8} --dist loadfile"
else
  XDIST=""
fi
part() {  # part NAME SECONDS CMD...: CMD time-boxed (0 skips it), its output in $OUT/NAME.txt,
  local name=$1 secs=$2; shift 2  # outcomes in $OUT/NAME.outcomes, exit status in $OUT/NAME.rc
  rm -f "$OUT/$name.outcomes" "$OUT/$name.rc"
  echo "=== $name (limit $secs s) $(date -u +%T)"
  [ "$secs" -gt 0 ] || return 0
  PYTEST_OUTCOMES="$OUT/$name.outcomes" timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1
  local rc=$?; echo "$rc" > "$OUT/$name.rc"; echo "rc=$rc"
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed)" "$OUT/$name.txt" | tail -8
}
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; echo "commit ${COMMIT:-unknown}"; date -u
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, '| triton',
    triton.__version__, '| transformers', transformers.__version__, '| cuda available',
    torch.cuda.is_available(), torch.cuda.device_count())"
  echo "TRITON_INTERPRET=${TRITON_INTERPRET:-unset} | xdist: ${XDIST:-absent, one process}"
  # the conformance suite is a pytest run too (-p tessellm.testing.plugin): its outcomes as well
  part conformance ${CONF_S:-90} python3 -m tessellm.testing --backend cuda -q -rfE -p pytest_outcomes
  part kernels ${KERNELS_S:-200} $P $XDIST -m "not slow" ${PYTEST_ARGS:-} tests/kernels tests/backends
  part gpu ${GPU_S:-150} $P -m gpu ${PYTEST_ARGS:-} tests
  part pinned ${PINNED_S:-45} $P $XDIST -m "not slow" tests/models/test_parity.py \
    tests/entrypoints/test_generation_config.py tests/core/test_bad_input.py
  echo "=== summary $(date -u +%T)"
  python3 benchmarks/pytest_outcomes.py "$OUT/conformance.outcomes" "$OUT/kernels.outcomes" \
    "$OUT/gpu.outcomes" "$OUT/pinned.outcomes"
  echo "rc=$?"
} 2>&1 | tee "$OUT/gputests_log.txt"
