#!/usr/bin/env bash
# int4 (AWQ / GPTQ) MoE decode kernels (kernels/moe/decode_int4.py) and GPTQ act-order experts
# on one GPU, ~5 minutes cold (8 at most): the conformance suite's MoE cases on cuda, the int4
# Triton fused MoE tests (decode kernels and grouped GEMMs vs the pure-torch reference, a tiny
# AWQ and an act-order GPTQ Qwen3-MoE served on cuda with HF's greedy tokens), then one MoE
# layer of Qwen3-30B-A3B and of Mixtral-8x7B: int4 vs bf16 fused MoE at 1, 2, 4, 16 tokens
# (decode kernels at 1-4), L2 flushed, CUDA-graph timed, and the int4 grouped GEMMs at those
# sizes (int4's only path before; session 19's H100 run: 651 us at 1 token, 19x bf16).
# Run from the repository root: bash benchmarks/moeint4dec_device.sh   (OUT=... for the logs)
# Expect: "rc=0" three times, "passed" and no "failed"; per shape and token count one line
# "bf16 .. us  int4 .. us (int4/bf16 r)  int4 grouped .. us  decode kernels .. us  act-order
# .. us  int4 rel err e": e bf16 rounding, a few 1e-2 at most (as at 16 tokens, where the
# grouped GEMMs run); at 1-4 tokens int4 should beat bf16 (3.8x fewer bytes) and int4 grouped;
# act-order (x gathered per expert) close to int4; decode kernels are timed at 16 tokens too,
# where fused_moe takes the grouped GEMMs: if they win there, DECODE_MAX_TOKENS should reach
# further for int4. At 1 token a sweep of the decode kernels' rows a program ("best UP,DOWN":
# INT4_DECODE_ROWS's tuning). JSON in $OUT/moeint4dec_bench.json.
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t moeint4dec_conformance ${MOEINT4DEC_CONF_S:-150} \
  python3 -m tessellm.testing --backend cuda -q -k moe
t moeint4dec_tests ${MOEINT4DEC_TEST_S:-180} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_moe_int4.py -k "triton or cuda_backend or act_order"
t moeint4dec_bench ${MOEINT4DEC_BENCH_S:-240} \
  python3 benchmarks/kernels/bench_moe_int4_decode.py --json "$OUT/moeint4dec_bench.json"
grep -h "tokens" "$OUT/moeint4dec_bench.txt"
