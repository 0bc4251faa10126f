# Sourced by the device (GPU) scripts, from the repository root: $OUT made (default
# /tmp/tessellm-out); the wheels in $WHL (default .whl/: packages the device image lacks, see README.md here)
# installed into /tmp/site, unless SKIP_WHL is set (a script that sourced this already did, then
# calls another); PYTHONPATH: /tmp/site and this tree, or this tree after what was there.
# The CPU scripts' counterpart is cpu_env.sh.
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
WHL=${WHL:-.whl}
if [ -d "$WHL" ] && [ -z "${SKIP_WHL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHL"/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD
fi
# box NAME SECONDS CMD...: CMD time-boxed (SECONDS 0 skips it), warnings dropped, its last $TAIL
# (3) lines kept; B: the bench CLI; L8: the Llama-3.1-8B shapes (scripts may redefine these)
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
        [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-3}; }
# t NAME SECONDS CMD...: CMD time-boxed (SECONDS 0 skips it, as box does), its whole output in
# $OUT/NAME.txt, then its exit status and its pytest summary / failure lines (the last $TAIL_T, 25)
t() { local name=$1 secs=$2; shift 2; echo "=== $name (limit $secs s) $(date -u +%T)"
      [ "$secs" -gt 0 ] || return 0
      timeout "$secs" "$@" > "$OUT/$name.txt" 2>&1; echo "rc=$?"
      grep -E "passed|failed|FAILED|Error|^(FAIL|ERROR)" "$OUT/$name.txt" | tail -${TAIL_T:-25}; }
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
L8=benchmarks/model-configs/llama-3.1-8b
