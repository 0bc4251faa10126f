#!/usr/bin/env bash
# The owed GPU checks that matter most, in ONE call (~9 min; run it with the 600 s limit), for a
# session whose device time is scarce: each part is another script with its limits cut down,
# its output under $OUT/<part>/.
#   1 graphs    graphlogits_device.sh's captured GPU parity tests (the decode overlap's side
#               streams in graphs: the capture that segfaulted in session 23, fixed in 51ef8c6;
#               one shared logits buffer) -- GRAPHS_S, 200
#   2 gpu       gputests_device.sh's `gpu` part (every gpu-marked test, one process) -- GPU_S, 170
#   3 fstart    graphlogits_device.sh's F start at 0.90 (KV blocks ~26,930 expected, the graphs'
#               reserve ~0.33 GiB, run 1 segments +0) -- F_S, 130
#   4 specprof  specprof_device.sh's draft90 part (a 1B draft model, k = 4) -- D90_S, 70
# Knobs: the limits above (0 skips a part). Each part's expectations are in its script's header.
#   bash benchmarks/owed_device.sh     (repo root; carry .whl and tessellm.egg-info as usual)
set -u
source benchmarks/device_env.sh
export SKIP_WHL=1  # installed once, here
ROOT_OUT=$OUT
run_part() {  # run_part NAME CMD...: CMD with OUT=$ROOT_OUT/NAME
  mkdir -p "$ROOT_OUT/$1"; echo "##### $1 $(date -u +%T)"
  local name=$1; shift
  OUT="$ROOT_OUT/$name" "$@" 2>&1 | tee "$ROOT_OUT/$name/log.txt" | tail -40
}
[ "${GRAPHS_S:-200}" -gt 0 ] && run_part graphs env TEST_S="${GRAPHS_S:-200}" F_S=0 RECUR_S=0 bash benchmarks/graphlogits_device.sh
[ "${GPU_S:-170}" -gt 0 ] && run_part gpu env GPU_S="${GPU_S:-170}" CONF_S=0 KERNELS_S=0 PINNED_S=0 bash benchmarks/gputests_device.sh
[ "${F_S:-130}" -gt 0 ] && run_part fstart env TEST_S=0 F_S="${F_S:-130}" RECUR_S=0 bash benchmarks/graphlogits_device.sh
[ "${D90_S:-70}" -gt 0 ] && run_part specprof env D90_S="${D90_S:-70}" D95_S=0 EAGLE_S=0 OV_S=0 TEST_S=0 bash benchmarks/specprof_device.sh
echo "##### done $(date -u +%T)"
