#!/usr/bin/env bash
# In-pass state saves (hsnap2, session 19) on one GPU, ~4 minutes cold (each part time-boxed):
#   tests      the sequential Mamba scan and the gated delta chunk kernel with snapshots= against
#              their per-piece runs (bitwise, float32), the Mamba kernels (compiled for the GPU)
#   conf       the cuda conformance of the state saves (plugin API 21 and 22: no skips)
#   engine     the GPU prefix-cache hits (decode graphs, async scheduling) on Mamba2 and
#              Granite 4.0-H: HF's greedy tokens
#   host_step  per model the host ms of a cached prompt's eager steps and launches per layer
# Run from the repository root: bash benchmarks/hsnap2_device.sh   (OUT=... for the logs;
# TESTS_S=0 / HOST_S=0 skip a part)
# Expect: tests, conf, engine all passed (conf: 0 SKIPPED lines of keeps_states_inside);
# host_step: one JSON line per model, against hybfast_device.sh's session-19 H100 run
# (b_ms_per_layer 0.50, mamba2): B's rest saves the state after its last full block inside
# the step; the sequential scan now keeps it in its one launch, where it ran once per piece
# (2 scan launches, a state copy and a cat a layer): launches_per_layer down by about 3, b_ms_per_layer
# down by those launches' host cost (unmeasured when this landed).
source benchmarks/device_env.sh
export TESSELLM_SSD_SCAN=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
P="python3 -m pytest -q -p no:cacheprovider"
t tests ${TESTS_S:-150} $P tests/kernels/test_state_saves.py tests/kernels/test_gated_delta_kernels.py \
  tests/kernels/test_mamba_kernels.py
t conf ${TESTS_S:-60} python3 -m tessellm.testing --backend cuda -q -rs -k "keeps_states_inside"
grep -c "SKIPPED" "$OUT/conf.txt"
t engine ${TESTS_S:-120} $P -m gpu tests/models/test_recurrent_prefix_cache.py -k cuda_hits
t host_step ${HOST_S:-120} python3 benchmarks/hybrid_host_step.py --device cuda \
  --models mamba2 granite4h
grep -h '^{' "$OUT/host_step.txt"
