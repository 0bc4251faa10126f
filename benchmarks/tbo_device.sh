#!/usr/bin/env bash
# Issue 22 (GPU), tbo: the decode overlap's MIXED split (--enable-decode-overlap, off by default;
# tessellm/core/decode_overlap.py): a chunked-prefill step's decode rows | its prefill chunks,
# the decodes' attention (HBM-bound) on a side stream beside the prefill's GEMMs (compute-bound),
# the GEMMs carved out by N SMs (--decode-overlap-sm-carveout: cuBLASLt's SM count target) so
# the attention finds room. Random Llama-3.1-8B shapes (--load-format dummy), bf16, one GPU.
# Each step is time-boxed (seconds, env; 0 skips it); ~8.5 min at the boxes, run it with a
# 600 s limit:
#   1. GPU tests (TEST_S 120): tests/models/test_cuda_decode_overlap.py: fp32 greedy tokens =
#      HF's and the unsplit engine's with two CUDA streams (pure-decode halves in graphs and
#      eager; mixed splits with a 64-token budget and carve-out 16), the carve-out scope sets
#      cuBLASLt + the carve-out and restores both. Line: "rc=0" then "N passed".
#   2. One mixed step timed (STEP_S 100, benchmarks/tbo_step.py): D = 256 and 128 decode rows at
#      context 640 beside 2 x 384 prompt tokens (F's step at a 1024-token budget); a table per
#      setting (gpu ms; host ms: queuing time, near gpu means host-bound), then
#      "SUMMARY D=.. P=..: serial X ms, best overlap_cN Y ms (X/Y), prefill_only A + decode_only
#      B": X/Y > 1 means the split wins on that step; Y near A means the decodes hid whole.
#      "BEST_CARVEOUT=N": D=256's best carve-out, used by step 3 (CARVE=N forces one).
#   3. F bf16 (256 x 512 in / 256 out; F_S 75 each, warm-up WARMUP=tiny so four fit): the
#      default engine; a smaller token budget alone (--max-num-batched-tokens $BUDGET, 1024:
#      decode rows ride along with prefill chunks, ~768 prompt tokens beside 256 decodes, so
#      the prefill spreads over ~170 steps instead of 9); that budget + the overlap (not
#      carved); that budget + the overlap carved out by step 2's best (32 when its best is
#      uncarved). Lines "f_* N tok/s T s, preemptions P, split steps {'mixed': M, 'decode': 0}"
#      (M: steps the overlap split in the timed run), then "ratio f_X / f_base = r". Arithmetic
#      (H200): F is ~4.3 s of GEMM rows at ~22 us a row + ~1.3 s of decode attention + the
#      tail; a budget near 768-1024 hides most of that attention under prefill GEMMs (~5.2 s,
#      ~12.5k tok/s at best) but leaves a tail of shrinking pure-decode batches. A second call
#      with TEST_S=0 STEP_S=0 BUDGET=768 (or 2048) F_S=75 tries another budget (~5 min).
#   4. L bf16 (1024 in / 1024 out, 512 requests; L_S, default 0: skipped) the same four ways:
#      its second 256 requests prefill while the first decode, so mixed steps come by
#      themselves. As a second call: TEST_S=0 STEP_S=0 F_S=0 L_S=130 CARVE=<step 2's best>
#      bash benchmarks/tbo_device.sh   (~8.5 min). Lines "l_* N tok/s", "ratio l_* / l_base".
#   5. Optional (DSTEP_S, default 0; ~70 s each, two runs): the pure-decode halves at 512 rows
#      (context DCTX, 512; 1024 fits an H200's KV cache), unsplit / split with the carve-out, as
#      captured graphs: JSON lines with graph_gpu_ms_per_step (decode_overlap_step.py).
# What decides the default: the overlap stays off unless "budget+overlap" beats both f_base and
# f_budget in F (and the step in 2 wins at D=256); then its budget, min batch and carve-out are
# the ones to make default (the engine's max_num_batched_tokens default is 16384 on GPUs).
#   COMMIT=<hash> bash benchmarks/tbo_device.sh    (repo root; carry .whl and tessellm.egg-info)
# Knobs: BUDGET (1024), CARVE (step 2's best), MIN_BATCH (128: --decode-overlap-min-batch),
# MIN_PREFILL (512), WARMUP (tiny | full), TEST_S, STEP_S, F_S, L_S, DSTEP_S.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
BUDGET=${BUDGET:-1024}
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096 --warmup ${WARMUP:-tiny}"
L="throughput --model $L8 --load-format dummy --num-prompts 512 --input-len 1024 --output-len 1024 --max-model-len 4096 --warmup ${WARMUP:-tiny}"
OV="--enable-decode-overlap --decode-overlap-min-batch ${MIN_BATCH:-128} --decode-overlap-min-prefill ${MIN_PREFILL:-512}"
tput() { for f in "$@"; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's, preemptions', d.get('preemptions'), ', split steps', d.get('decode_overlap_splits'))" "$OUT/$f.json" $f; done; }
ratio() { [ -f "$OUT/$1.json" ] && [ -f "$OUT/$2.json" ] && python3 -c "import json,sys; a, b = (json.load(open(p))['output_tokens_per_s'] for p in sys.argv[1:3]); print('ratio', sys.argv[2].split('/')[-1][:-5], '/', sys.argv[1].split('/')[-1][:-5], '= %.3f' % (b / a))" "$OUT/$1.json" "$OUT/$2.json"; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'carve-out', hasattr(torch._C, '_set_sm_carveout_experimental'))"
  echo "commit ${COMMIT:-unknown}, budget $BUDGET, overlap flags: $OV"; date -u
  t tests ${TEST_S:-120} python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_cuda_decode_overlap.py
  t step ${STEP_S:-100} python3 benchmarks/tbo_step.py --model $L8 --prompt-len 384 --output-json "$OUT/tbo_step.json"
  grep -E "SUMMARY|BEST_CARVEOUT|Traceback|Error" "$OUT/step.txt" 2>/dev/null | tail -6
  [ -f "$OUT/tbo_step.json" ] && python3 -c "
import json, sys
for r in json.load(open(sys.argv[1]))['results']:
    print('  D=%(decodes)d P=%(prompt_tokens)d %(setting)-17s gpu %(gpu_ms)8.3f ms  host %(host_ms)s ms' % r)" "$OUT/tbo_step.json"
  BEST=${CARVE:-$( [ -f "$OUT/tbo_step.json" ] && python3 -c "
import json, sys
rs = [r for r in json.load(open(sys.argv[1]))['results'] if r['decodes'] == 256 and r['setting'].startswith('overlap')]
print(min(rs, key=lambda r: r['gpu_ms'])['setting'].removeprefix('overlap_c'))" "$OUT/tbo_step.json")}
  [ -z "$BEST" ] || [ "$BEST" = none ] && BEST=32
  echo "carve-out for the F / L runs: $BEST"
  for w in f l; do  # F (F_S 75 each), then L (L_S, default 0: a second call)
    W=$F; S=${F_S:-75}; [ $w = l ] && W=$L && S=${L_S:-0}
    box "$w base" $S $B $W --output-json "$OUT/${w}_base.json"
    box "$w budget $BUDGET" $S $B $W --max-num-batched-tokens $BUDGET --output-json "$OUT/${w}_budget.json"
    box "$w budget + overlap" $S $B $W --max-num-batched-tokens $BUDGET $OV --output-json "$OUT/${w}_overlap.json"
    box "$w budget + overlap, carve-out $BEST" $S $B $W --max-num-batched-tokens $BUDGET $OV --decode-overlap-sm-carveout $BEST --output-json "$OUT/${w}_overlap_c$BEST.json"
  done
  # 5. optional (DSTEP_S, default 0): a captured pure-decode step of 512 rows at context DCTX
  #    (512: its KV fits an H100), unsplit against the halves carved out by $BEST
  for o in 0 1; do
    TAIL=1 box "decode step 512 rows ctx ${DCTX:-512} halves $o" ${DSTEP_S:-0} python3 benchmarks/decode_overlap_step.py \
      --model $L8 --batch 512 --input-len ${DCTX:-512} --overlap $o --sm-carveout $BEST --iters 20
  done
  echo "=== summary"
  for w in f l; do
    tput ${w}_base ${w}_budget ${w}_overlap ${w}_overlap_c$BEST
    for f in ${w}_budget ${w}_overlap ${w}_overlap_c$BEST; do ratio ${w}_base $f; done
  done
  grep -h SUMMARY "$OUT/step.txt" 2>/dev/null
} 2>&1 | tee "$OUT/log.txt"
