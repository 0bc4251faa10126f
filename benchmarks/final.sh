#!/usr/bin/env bash
# Issue 22 (GPU): every GPU figure the issue asks for, on one machine, this tree only, in three
# device calls made back to back (PART=1, 2, 3; the machine stays warm between them, so its
# Triton cache does too). Every step is time-boxed (seconds, env; 0 skips it):
#   PART=1  prefill attention 1x512 / 16x512 / 2k / 8k against SDPA flash and cuDNN (ATTN_S 70,
#           gpuperf_probe.py attn_quick); B1 bf16 and fp8, each also with TESSELLM_SILU_FOLD=0
#           and fp8 with TESSELLM_FP8_ACT_FOLD=0: both folds are on by default (B1_S 50 each;
#           the fp8 runs' TTFT is the fp8 512-token TTFT goal); an 8k-token single prefill, bf16
#           and fp8 (TTFT8K_S 60 each); the B1 kernel chain, full against 'silu fold' (CHAIN_S
#           60)                                                           ~ 490 s warm
#   PART=2  F bf16 (F_S 70); HF F static batch 256, cuDNN SDPA off, the ratio's baseline (HF_S
#           70); F fp8 = fp8 weights + fp8 KV (F8_S 80); F fp8 with TESSELLM_FP8_ACT_FOLD=0 (the
#           default folds the per-token fp8 quantisation into the RMSNorm / SiLU before each GEMM; F8F_S 80);
#           a batch-256 fp8 decode step's kernels with and without the fold (PROF_S 60 each)
#                                                                         ~ 480 s warm
#   PART=3  L bf16 (L_S 150); L with an fp8 KV cache, for the record (L8_S 150) ~ 300 s warm
# A freshly started machine has an empty Triton cache: PART=1's first runs compile (on
# 2026-12-04 a cold F fp8 with a 55 s box and a cold L with 100 s both timed out), so run PART=1
# first and keep the calls back to back. Each part ends with a summary of its JSON files.
#   PART=1 bash benchmarks/final.sh      (repo root; carry .whl and tessellm.egg-info)
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
source benchmarks/device_env.sh
PART=${PART:-1}
LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 3"
LAT8K="$B latency --load-format dummy --max-model-len 8704 --model $L8 --num-iters 3 --input-len 8192 --output-len 8"
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256"
L="throughput --model $L8 --load-format dummy --num-prompts 512 --input-len 1024 --output-len 1024 --max-model-len 4096"
PROF="python3 benchmarks/profile_step.py --batch 256 --quantization fp8 --kv-cache-dtype fp8"
latency() { for f in "$@"; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'TTFT ms', d['ttft_ms_median'], 'ms/token', d['tpot_ms_median'])" "$OUT/$f.json" $f; done; }
throughput() { for f in "$@"; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  echo "commit ${COMMIT:-unknown}, part $PART"; date -u
  case $PART in
  1)
    TAIL=30 box "prefill attention" ${ATTN_S:-70} python3 benchmarks/kernels/gpuperf_probe.py --out "$OUT" --sections attn_quick
    box "B1 bf16" ${B1_S:-50} $LAT --output-json "$OUT/b1.json"
    box "B1 fp8" ${B1_S:-50} $LAT --quantization fp8 --output-json "$OUT/b1_fp8.json"
    box "B1 bf16 silu fold off" ${B1_S:-50} env TESSELLM_SILU_FOLD=0 $LAT --output-json "$OUT/b1_nofold.json"
    box "B1 fp8 silu fold off" ${B1_S:-50} env TESSELLM_SILU_FOLD=0 $LAT --quantization fp8 --output-json "$OUT/b1_fp8_nofold.json"
    box "B1 fp8 act fold off" ${B1_S:-50} env TESSELLM_FP8_ACT_FOLD=0 $LAT --quantization fp8 --output-json "$OUT/b1_fp8_noactfold.json"
    box "8k prefill bf16" ${TTFT8K_S:-60} $LAT8K --output-json "$OUT/ttft8k.json"
    box "8k prefill fp8" ${TTFT8K_S:-60} $LAT8K --quantization fp8 --output-json "$OUT/ttft8k_fp8.json"
    TAIL=20 box "chain: full vs silu fold" ${CHAIN_S:-60} python3 benchmarks/kernels/decode_chain.py --out "$OUT" --sections chain --quick
    latency b1 b1_fp8 b1_nofold b1_fp8_nofold b1_fp8_noactfold ttft8k ttft8k_fp8 ;;
  2)
    box F ${F_S:-70} $B $F --max-model-len 4096 --output-json "$OUT/f.json"
    box "F hf nocudnn" ${HF_S:-70} $B $F --backend hf --hf-batch-size 256 --hf-disable-cudnn-sdpa --output-json "$OUT/f_hf_nocudnn.json"
    box "F fp8" ${F8_S:-80} $B $F --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/f_fp8.json"
    box "F fp8 act fold off" ${F8F_S:-80} env TESSELLM_FP8_ACT_FOLD=0 $B $F --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/f_fp8_nofold.json"
    TAIL=14 box "step fp8" ${PROF_S:-60} $PROF --output-json "$OUT/step_fp8.json"
    TAIL=14 box "step fp8 act fold off" ${PROF_S:-60} env TESSELLM_FP8_ACT_FOLD=0 $PROF --output-json "$OUT/step_fp8_nofold.json"
    throughput f f_hf_nocudnn f_fp8 f_fp8_nofold ;;
  3)
    box L ${L_S:-150} $B $L --output-json "$OUT/l.json"
    box "L fp8 KV" ${L8_S:-150} $B $L --kv-cache-dtype fp8 --output-json "$OUT/l_kvfp8.json"
    throughput l l_kvfp8 ;;
  esac
} 2>&1 | tee "$OUT/log.txt"
