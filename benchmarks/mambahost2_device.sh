#!/usr/bin/env bash
# Mamba2 / hybrid eager step host cost, second pass (mambahost2, session 22): Triton launches of
# the recurrent layers' kernels (conv, sequential scan, SSD, state update, gated RMSNorm,
# RMSNorm, gated delta) go through kernels/launch.FastLaunch (a seen specialization calls the
# kept compiled kernel's launcher: ~25 -> ~7 us of Python a 39-argument launch on the CPU,
# launcher stubbed); the mixer reads its ops' flags once, the SSD choice is made once a step.
# ~7 minutes on one GPU:
#   tests      the fast-launch tests (the CPU one against Triton's binder; on the GPU the gated
#              norm and sequential scan launched many times vs the reference) and the Mamba /
#              gated norm / gated delta kernel tests on the GPU (every later launch a kept one)
#   fast_on    hybrid_host_step mamba2 + granite4h (48 tokens after 192 cached), as mscan's
#              host_step ran them (session 22 before this: mamba2 b_ms 9.31, 0.388 ms host a
#              layer, ops 17.0, launches 6.3; granite4h 23.47 / 0.587 / 19.3 / 10.1)
#   fast_off   the same with TESSELLM_TRITON_FAST_LAUNCH=0 (Triton's own launch path): the A/B
#              on the same machine
# Run from the repository root: OUT=/tmp/mh2 bash benchmarks/mambahost2_device.sh
# (TESTS_S=0 / ON_S=0 / OFF_S=0 skip a part.)
# Read it so: tests rc=0 (all passed). fast_on b_ms under fast_off's by ~4 launches x ~10-20 us
# a layer (mamba2: ~1-2 ms of 9.3 a step; granite4h more: its attention layers' norms too);
# ops_per_layer / launches_per_layer the same in both (the cut is Python inside the launch,
# not ops); gpu_ms_per_layer the same.
source benchmarks/device_env.sh
export TESSELLM_SSD_SCAN=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TESSELLM_TRITON_FAST_LAUNCH=1
t tests ${TESTS_S:-240} python3 -m pytest -q -p no:cacheprovider tests/kernels/test_fast_launch.py \
  tests/kernels/test_mamba_kernels.py tests/kernels/test_gated_norm.py \
  tests/kernels/test_gated_delta_kernels.py tests/models/test_mamba_mixer_host.py
H="python3 benchmarks/hybrid_host_step.py --device cuda --models mamba2 granite4h"
t fast_on ${ON_S:-100} $H
grep -h '^{' "$OUT/fast_on.txt"
export TESSELLM_TRITON_FAST_LAUNCH=0
t fast_off ${OFF_S:-100} $H
grep -h '^{' "$OUT/fast_off.txt"
