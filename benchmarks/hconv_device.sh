#!/usr/bin/env bash
# The causal conv's in-launch state saves (hconv, session 20: plugin API 23,
# FusedOps.mamba_conv_state_saves) on one GPU, ~4 minutes cold (each part time-boxed):
#   tests      the Triton conv given snapshots= against save_conv_states + the plain conv
#              (bitwise, float32 and bfloat16), the other in-step saves (the scans' save loop
#              now one shared helper, kernels/recurrent_saves.py), the Mamba and gated delta
#              kernels, compiled for the GPU
#   conf       the cuda conformance of the state saves: the conv's (API 23) beside the scans'
#              (API 21 / 22), and the conv1d cases
#   engine     the GPU prefix-cache hits (decode graphs, async scheduling) on Mamba2 and
#              Granite 4.0-H: HF's greedy tokens
#   host_step  per model the host ms of a cached prompt's eager steps and launches per layer
#   tiles      the sequential Mamba scan's and the gated delta chunk kernel's launch settings
#              (block of head / value dims, warps: every tile spills registers when compiled for
#              sm90), timed against the default (benchmarks/kernels/bench_seq_tiles.py --quick:
#              128 and 2048 tokens; without --quick, 5 cases, ~2x the time)
# Run from the repository root: bash benchmarks/hconv_device.sh   (OUT=... for the logs;
# TESTS_S=0 / CONF_S=0 / ENGINE_S=0 / HOST_S=0 / TILES_S=0 skip a part; ~5 minutes cold,
# the limits sum to 550 s)
# Expect: tests, conf, engine all passed (conf: "0" on the line after it: no SKIPPED among
# keeps_states_inside, 3 of them: conv, scan, gated delta); host_step: one JSON line per model.
# Against hybfast_device.sh's session-19 H100 run (mamba2 0.50 ms / 41 ops / 11.3 launches a
# layer; granite4h 0.76 / 49 / 14.6): B's rest saves the state after its last full block inside
# its one step (offset 32 of 48 rows); hsnap2 (owed, not run yet) took the scan's per-piece run
# off (~3 launches a layer), this takes the conv snapshot's copy (1 launch; a slice, a
# transpose, a select and the foreach copy on the host) into the conv's state launch:
# launches_per_layer about 4 under hybfast's (~7.3 mamba2, ~10.6 granite4h), ops_per_layer
# ~4 under hsnap2's. Run hsnap2_device.sh's host_step beside it (same machine) to split the two.
# tiles: per kernel and shape a row of ms per (block, warps) setting (* the default: (64, 4) for
# the Mamba scans, (32, 4) for the delta rule), a "best ... default / best" line (unknown: if a
# setting wins by 10%+ at both lengths, make it sequential_config's / chunk_config's), and
# "largest relative difference from the default setting" under 1e-2 (rc=0).
source benchmarks/device_env.sh
export TESSELLM_SSD_SCAN=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider"
t tests ${TESTS_S:-150} $P tests/kernels/test_state_saves.py tests/kernels/test_mamba_kernels.py \
  tests/kernels/test_gated_delta_kernels.py
t conf ${CONF_S:-60} python3 -m tessellm.testing --backend cuda -q -rs \
  -k "keeps_states_inside or conv1d"
grep -c "SKIPPED" "$OUT/conf.txt"
t engine ${ENGINE_S:-110} $P -m gpu tests/models/test_recurrent_prefix_cache.py -k cuda_hits
t host_step ${HOST_S:-110} python3 benchmarks/hybrid_host_step.py --device cuda \
  --models mamba2 granite4h
grep -h '^{' "$OUT/host_step.txt"
t tiles ${TILES_S:-120} python3 benchmarks/kernels/bench_seq_tiles.py --quick
grep -E "settings|ms |best|largest" "$OUT/tiles.txt"
