#!/usr/bin/env bash
# Review (session 21): is the mixed split's loss the host's launches or the GPU? Session 21's
# tbo_step.py run had every split setting's host queuing time (host_ms) within 4 ms of its GPU
# time: the eager split step was launch-bound, so it did not show whether the decodes'
# attention overlaps the prefill's GEMMs. Here tbo_step.py --graph times each setting eager
# (gpu_ms, host_ms) and captured in a CUDA graph (graph_gpu_ms: no launch cost), D = 256 decode
# rows at context 640 beside 2 x 384 prompt tokens, carve-outs none / 0 / 32; then the new
# conformance case of the overlap streams (test_overlap_streams.py). ~1.5 min; run with a
# 300 s limit, from the repo root, carrying .whl and tessellm.egg-info:
#   bash benchmarks/tbo_graph_device.sh
# Reading: "SUMMARY D=256 ...; graphs (no launch cost): serial A, ..., overlap_cnone B, ...":
# B clearly under A: the GPU does overlap them and the eager split loses to its launches (worth
# capturing mixed steps, or fewer launches a layer); B at or over A: the kernels themselves do
# not overlap on this card. A setting the graph cannot capture prints graph_error. Conformance:
# "2 passed" (skipped: this torch has no carve-out).
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
t graph ${GRAPH_S:-200} python3 benchmarks/tbo_step.py --model $L8 --prompt-len 384 --decodes 256 \
  --carveouts ${CARVEOUTS:-none,0,32} --iters 10 --graph --output-json "$OUT/tbo_graph.json"
grep -E "SUMMARY|graph_error|Traceback" "$OUT/graph.txt" | cut -c1-600 | tail -8
t conformance ${CONF_S:-60} python3 -m tessellm.testing --backend cuda -q -rs -k overlap_streams
