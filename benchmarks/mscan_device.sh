#!/usr/bin/env bash
# Mamba2's cached-prefix step regression (mscan, session 20): hybrid_host_step's Mamba2 step
# (B's 48 tokens after a state prefix hit, a save at offset 32 inside the step) was 12.0 ms on
# an H100 in session 19 (per-piece scan, conv window copied: 41 ops / 11.3 launches a layer)
# and 18.59 ms in hconv's run (one-pass scan with SAVES, 0d197dc; conv saves in its state
# launch, 42f1974: 24 ops / 7.3 launches), while Granite 4.0-H went 30.4 -> 27.6 ms. On the
# CPU nothing explains it: compiled for sm_90a (benchmarks/kernels/aot_seq_scan.py) the
# one-pass scan (SAVES=1) and the old plain kernel have the same registers (255), stack
# (3040-3080 B), spills (~3.8 KB) and MMAs (336); B still runs two 32-token chunks; the Triton
# compiles after ready (host_step.txt) all fall in the warm-up round (one of each variant); the
# save plan is one int32 upload a step per batch object (2: the conv's batch, the scan's
# prefills), no host sync. So this measures, ~4 minutes on one GPU:
#   host_step     both models as hconv ran them, now with gpu_ms_per_layer (the B steps'
#                 summed kernel time over layers, profiled round) and top_kernels
#                 ({kernel: [us a layer, runs a layer]}, copies included)
#   noscan        Mamba2 with the scan's in-pass saves off (--no-inpass scan: once per piece)
#   noboth        Mamba2 with the conv's off too (--no-inpass scan conv: the session-19 path)
#   scan_saves    kernels/bench_scan_saves.py: one layer's scan and conv at 48 tokens with a
#                 save at 32, none / inpass / pieces, GPU us (graph replays) / eager wall us
# Run from the repository root: bash benchmarks/mscan_device.sh   (OUT=... for the logs;
# HOST_S=0 / NOSCAN_S=0 / NOBOTH_S=0 / SAVES_S=0 skip a part; limits sum to 250 s)
# Read it so:
# * host_step mamba2: gpu_ms_per_layer near b_ms_per_layer (~0.75) -> the step waits on the
#   GPU; top_kernels names the kernel (a _chunk_scan_kernel at ~0.6 ms a layer: the SAVES
#   scan is slow at run time, see scan_saves' inpass vs pieces GPU us). gpu_ms_per_layer far
#   under it (~0.1-0.2, expected: 24 heads x 48 tokens is little work) -> host-bound:
# * noscan / noboth b_ms back near 12 ms -> the in-pass path costs host time (Triton launch /
#   save plan: compare their top_kernels' Memcpy HtoD runs); b_ms still ~18 ms in noboth ->
#   neither new path: the machine (the empty 2nd step's 0.09 -> 0.15 ms hints a slower host
#   in hconv's run) or another commit; rerun hybfast_device.sh's host_step at 0d197dc^ beside.
# * scan_saves expected: inpass GPU us within ~10% of pieces for scan (~same two chunks; pieces
#   pays a second launch), conv inpass <= pieces; eager wall of inpass under pieces; largest
#   relative difference < 1e-2 (rc=0).
source benchmarks/device_env.sh
export TESSELLM_SSD_SCAN=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
H="python3 benchmarks/hybrid_host_step.py --device cuda"
t host_step ${HOST_S:-100} $H --models mamba2 granite4h
grep -h '^{' "$OUT/host_step.txt"; grep -c "Triton compiled" "$OUT/host_step.txt"
t noscan ${NOSCAN_S:-55} $H --models mamba2 --no-inpass scan
grep -h '^{' "$OUT/noscan.txt"
t noboth ${NOBOTH_S:-55} $H --models mamba2 --no-inpass scan conv
grep -h '^{' "$OUT/noboth.txt"
t scan_saves ${SAVES_S:-40} python3 benchmarks/kernels/bench_scan_saves.py
grep -E "scan|conv|largest" "$OUT/scan_saves.txt"
