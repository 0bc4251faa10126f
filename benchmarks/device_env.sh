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
