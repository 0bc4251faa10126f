# Sourced by the before/after device scripts (b1_device.sh, b1f_device.sh, b1g_device.sh,
# f8g_device.sh), from the repository root: device_env.sh ($OUT, the wheels, PYTHONPATH), then
#   NEW  this tree;  OLD  the baseline tree ($OLD, may be empty: this tree only)
#   box NAME SECONDS DIR CMD...  CMD run from DIR with DIR's tessellm first on the path, time-boxed
#                                (SECONDS 0 skips it), warnings dropped, the last $TAIL (40) lines kept
#   B    the bench CLI (device_env.sh)
. benchmarks/device_env.sh
NEW=$PWD OLD=${OLD:-}
box() { local name=$1 secs=$2 dir=$3; shift 3; echo "=== $name (limit ${secs} s) $(date -u +%T)";
        [ "$secs" -gt 0 ] && (cd "$dir" && PYTHONPATH=/tmp/site:$dir timeout "$secs" "$@" 2>&1) \
          | grep -v -i warn | tail -${TAIL:-40}; }
