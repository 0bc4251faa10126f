#!/usr/bin/env bash
# Issue 22 (GPU), perf22: the Triton tile GEMM for decode-sized row counts and its SiLU-and-mul
# dual epilogue (tessellm/kernels/gemm/decode_gemm.py; TESSELLM_DECODE_GEMM, off by default)
# against cuBLAS + a separate SiLU-and-mul, side by side on one GPU, random Llama-3.1-8B shapes
# (--load-format dummy), bf16. Each step is time-boxed (seconds, env; 0 skips it): at most
# 8.2 min at the boxes, ~7 expected on a cold machine (run it with a 540 s limit):
#   1. GPU tests (TEST_S 110): tests/kernels/test_decode_gemm.py (Llama-8B shapes, three launch
#      shapes, bitwise SiLU epilogue), tests/models/test_decode_gemm_engine.py (fp32 HF parity
#      with graphs, the path on), cuda conformance -k linear with TESSELLM_DECODE_GEMM=1 (CONF_S 40).
#   2. decode_gemm_bench.py (BENCH_S 90): the four decoder products at 256 and 512 rows,
#      cuBLAS vs the default launch shape vs 10 others -> $OUT/decode_gemm.json.
#   3. A batch-256 captured decode step at context 512 (STEP_S 55 each): GPU ms off / $DG,
#      and the first decode step's logits on against off. "On" is what step 2's 256-row figures
#      favour (decode_gemm_bench.py --choose, printed): TESSELLM_DECODE_GEMM=silu / linear / 1,
#      _MAX_N (4096: o and down only; 6144: qkv too), _SILU_TILES (the dual kernel's winner at
#      >= 3% over its default); silu when nothing wins. DG=<value> forces the first and keeps
#      the caller's TESSELLM_DECODE_GEMM_MAX_N / _SILU_TILES (a second call for L: e.g.
#      DG=1 TESSELLM_DECODE_GEMM_MAX_N=4096 L_S=150 TEST_S=0 CONF_S=0 BENCH_S=0 STEP_S=0 F_S=0).
#   4. F (256 x 512 in / 256 out) off and on (F_S 70 each).
#   5. L off / on (L_S, default 0: skipped; 150 each when run alone in a second call).
#   COMMIT=<hash> bash benchmarks/perf22_device.sh    (repo root; carry .whl, tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
DG=${DG:-}  # empty: the sweep chooses (step 2)
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096"
L="throughput --model $L8 --load-format dummy --num-prompts 512 --input-len 1024 --output-len 1024 --max-model-len 4096"
STEP="python3 benchmarks/decode_overlap_step.py --model $L8 --batch 256 --overlap 0"
tput() { for f in "$@"; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done; }
ratio() { [ -f "$OUT/$1.json" ] && [ -f "$OUT/$2.json" ] && python3 -c "import json,sys; a, b = (json.load(open(p))['output_tokens_per_s'] for p in sys.argv[1:3]); print(sys.argv[3], 'on / off = %.3f' % (b / a))" "$OUT/$1.json" "$OUT/$2.json" "$3"; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}, DG=${DG:-from the sweep}"; date -u
  t tests ${TEST_S:-110} python3 -m pytest -q -p no:cacheprovider -x tests/kernels/test_decode_gemm.py tests/models/test_decode_gemm_engine.py
  t conformance ${CONF_S:-40} env TESSELLM_DECODE_GEMM=1 python3 -m tessellm.testing --backend cuda -q -k linear
  TAIL=14 box "decode_gemm_bench" ${BENCH_S:-90} python3 benchmarks/kernels/decode_gemm_bench.py --rows 256 512 --out "$OUT/decode_gemm.json"
  # the setting the sweep's 256-row figures favour (decode_gemm_bench.py --choose): which
  # products, the plain products' bound, the dual kernel's launch shape; DG given: that instead
  read -r DGC MAXN TILES < <(python3 benchmarks/kernels/decode_gemm_bench.py --choose --out "$OUT/decode_gemm.json" 2>/dev/null || echo "silu - -")
  [ "$MAXN" = "-" ] && MAXN=""; [ "$TILES" = "-" ] && TILES=""
  if [ -z "$DG" ]; then  # else the caller's DG, TESSELLM_DECODE_GEMM_MAX_N and _SILU_TILES stay
    DG=$DGC; export TESSELLM_DECODE_GEMM_MAX_N=$MAXN TESSELLM_DECODE_GEMM_SILU_TILES=$TILES
  fi
  echo "path on = TESSELLM_DECODE_GEMM=$DG, _MAX_N=${TESSELLM_DECODE_GEMM_MAX_N:-default}, _SILU_TILES=${TESSELLM_DECODE_GEMM_SILU_TILES:-default} (the sweep's choice: $DGC ${MAXN:-default} ${TILES:-default})"
  for mode in 0 $DG; do
    TAIL=2 box "step ctx 512 DECODE_GEMM=$mode" ${STEP_S:-55} env TESSELLM_DECODE_GEMM=$mode $STEP --input-len 512 \
      --output-json "$OUT/step_512_$mode.json" --logits-out "$OUT/logits_512_$mode.pt"
  done
  for mode in $DG; do
    [ -f "$OUT/logits_512_0.pt" ] && [ -f "$OUT/logits_512_$mode.pt" ] && echo "logits $mode vs off:" \
      && python3 benchmarks/decode_overlap_step.py --compare "$OUT/logits_512_0.pt" "$OUT/logits_512_$mode.pt"
  done
  rm -f "$OUT"/logits_*.pt
  box "F off" ${F_S:-70} $B $F --output-json "$OUT/f_off.json"
  box "F DECODE_GEMM=$DG" ${F_S:-70} env TESSELLM_DECODE_GEMM=$DG $B $F --output-json "$OUT/f_on.json"
  box "L off" ${L_S:-0} $B $L --output-json "$OUT/l_off.json"
  box "L DECODE_GEMM=$DG" ${L_S:-0} env TESSELLM_DECODE_GEMM=$DG $B $L --output-json "$OUT/l_on.json"
  tput f_off f_on l_off l_on; ratio f_off f_on F; ratio l_off l_on L
  for mode in 0 $DG; do [ -f "$OUT/step_512_$mode.json" ] && cat "$OUT/step_512_$mode.json" && echo; done
  date -u
} 2>&1 | tee "$OUT/log.txt"
