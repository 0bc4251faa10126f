#!/usr/bin/env bash
# Issue 22 (GPU): the decode micro-batch overlap (TESSELLM_DECODE_OVERLAP=1, off by default;
# tessellm/core/decode_overlap.py) against the default, side by side on one machine, random
# Llama-3.1-8B shapes (--load-format dummy), bf16. Every step is time-boxed (seconds, env; 0
# skips it). The bench harness runs each workload twice (a full warm-up, then the timed run), as
# benchmarks/final.sh does, so its figures compare with session 14's (F 10,403, L 9,740):
#   PART=main (default)  F off, F on (F_S 80 each); L off, L on (L_S 150 each); F on with
#                        TESSELLM_PDL=0 (FP_S, default 0: skipped)  ~ 6.5 min warm, 7.7 at the boxes
#   PART=check           the GPU tests of the split (fp32 greedy tokens = HF's and the unsplit
#                        engine's, graphs and eager, two streams: TEST_S 90); a batch-256 captured
#                        decode step, GPU ms off and on at context 512 (F's) and 1536 (L's
#                        middle), and the first decode step's bf16 logits on against off (argmax
#                        agreement, max |diff|) (STEP_S 70 each, 4 runs)   ~ 5 min
# Run PART=check first on a cold machine: it compiles the split's kernels before F and L time.
# STEPS (default decode: this script's pure-decode halves; mixed splits are tbo_device.sh's).
# MIN_ROWS (default 128): the smallest step (graph size) that splits. F and L run 256
# sequences, so their decode steps split into 128 + 128.
#   bash benchmarks/overlap_device.sh    (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
PART=${PART:-main}
MIN_ROWS=${MIN_ROWS:-128}
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256 --max-model-len 4096"
L="throughput --model $L8 --load-format dummy --num-prompts 512 --input-len 1024 --output-len 1024 --max-model-len 4096"
ON="env TESSELLM_DECODE_OVERLAP=1 TESSELLM_DECODE_OVERLAP_STEPS=${STEPS:-decode} TESSELLM_DECODE_OVERLAP_MIN_ROWS=$MIN_ROWS"
STEP="python3 benchmarks/decode_overlap_step.py --model $L8 --batch 256 --min-rows $MIN_ROWS"
tput() { for f in "$@"; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done; }
ratio() { [ -f "$OUT/$1.json" ] && [ -f "$OUT/$2.json" ] && python3 -c "import json,sys; a, b = (json.load(open(p))['output_tokens_per_s'] for p in sys.argv[1:3]); print(sys.argv[3], 'on / off = %.3f' % (b / a))" "$OUT/$1.json" "$OUT/$2.json" "$3"; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}, part $PART, min rows $MIN_ROWS"; date -u
  case $PART in
  main)
    box "F off" ${F_S:-80} $B $F --output-json "$OUT/f_off.json"
    box "F on" ${F_S:-80} $ON $B $F --output-json "$OUT/f_on.json"
    box "L off" ${L_S:-150} $B $L --output-json "$OUT/l_off.json"
    box "L on" ${L_S:-150} $ON $B $L --output-json "$OUT/l_on.json"
    box "F on, PDL off" ${FP_S:-0} $ON TESSELLM_PDL=0 $B $F --output-json "$OUT/f_on_nopdl.json"
    tput f_off f_on f_on_nopdl l_off l_on; ratio f_off f_on F; ratio l_off l_on L ;;
  check)
    t tests ${TEST_S:-90} python3 -m pytest -q -p no:cacheprovider -rs tests/models/test_cuda_decode_overlap.py
    for ctx in 512 1536; do
      for o in 0 1; do
        TAIL=2 box "step ctx $ctx overlap $o" ${STEP_S:-70} $STEP --input-len $ctx --overlap $o \
          --output-json "$OUT/step_${ctx}_$o.json" --logits-out "$OUT/logits_${ctx}_$o.pt"
      done
      [ -f "$OUT/logits_${ctx}_0.pt" ] && [ -f "$OUT/logits_${ctx}_1.pt" ] && echo "ctx $ctx logits on vs off:" \
        && python3 benchmarks/decode_overlap_step.py --compare "$OUT/logits_${ctx}_0.pt" "$OUT/logits_${ctx}_1.pt"
    done
    rm -f "$OUT"/logits_*.pt ;;
  esac
} 2>&1 | tee "$OUT/log.txt"
