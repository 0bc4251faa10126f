#!/usr/bin/env bash
# Dense AWQ / GPTQ int4 (W4A16) on one GPU, ~4-5 minutes on a cold H100 (8 at most): the int4 kernel
# tests on the GPU (the decode GEMV gemv_int4 and the tiled GEMM against the torch reference,
# the quant conformance case (int4 at 1 and 5 rows),
# the quantized-GEMM suite's int4 cases, the AWQ / GPTQ checkpoints' logits on cuda), then one
# table of Llama-3.1-8B layer shapes at 1, 4, 16, 128, 1024 rows: bf16 cuBLAS vs int4 before
# session 19 ("old": one load per code) vs now ("new": TritonQuantOps.int4_mm), L2 flushed.
# Run from the repository root: bash benchmarks/int4dense_device.sh   (OUT=... for the logs)
# Expect: "rc=0" six times, "passed" and no "failed"; the table (us and effective TB/s of the
# weight read), one "layer M=..." line per row count, err ~1e-2 or below. Hoped for: "new" well
# under "old" at every M below 512 (several x at 1-16 rows), int4 under bf16 at 1-4 rows.
# Tuning read from it: INT4_GEMV_MAX_M (gemv_int4.py: "new" at 4 rows vs "tiled"),
# DEQUANT_MIN_M (weight_only.py: "tiled" vs "deq+cuBLAS" at 128 / 1024 rows); then 8 "sweep"
# lines (the GEMV over BKW and PROGRAMS_PER_SM at 1 and 4 rows: gemv_int4_config's defaults).
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t int4dense_kernels ${INT4D_TEST_S:-100} python3 -m pytest -q -p no:cacheprovider \
  tests/kernels/test_gemv_int4.py
t int4dense_conformance ${INT4D_CONF_S:-60} python3 -m tessellm.testing --backend cuda -q \
  -k "declared_schemes"
t int4dense_quant_kernels ${INT4D_QTEST_S:-90} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_kernels.py -k "int4 or dequantize or other_dtypes"
t int4dense_checkpoints ${INT4D_CKPT_S:-60} python3 -m pytest -q -p no:cacheprovider \
  tests/quantization/test_loading.py -k "test_int4_checkpoint and not cpu"
t int4dense_bench ${INT4D_BENCH_S:-200} python3 benchmarks/kernels/bench_int4_dense.py \
  --json "$OUT/int4dense_bench.json"
grep -v -i warn "$OUT/int4dense_bench.txt" | tail -28
t int4dense_sweep ${INT4D_SWEEP_S:-75} python3 benchmarks/kernels/bench_int4_dense.py --sweep
grep -h "^sweep" "$OUT/int4dense_sweep.txt"
