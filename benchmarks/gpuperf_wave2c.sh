#!/usr/bin/env bash
# Issue 22 (GPU), wave 2c: where a decode step's time goes.
#   PART=probe: (1) benchmarks/kernels/decode_chain.py: the batch-1 decode chain (32 layers,
#     PDL, CUDA graph) bf16 and fp8, whole and without each kind of kernel, against the
#     weight floor; the split-KV decode kernel at L's and F's contexts; (2)
#     benchmarks/profile_step.py at batch 256 (F): host phases, GPU time of the graph, GPU idle
#     per step, kernel table; (3) F and HF F (static batch 256, cuDNN SDPA off) side by side.
#   PART=final: the B1 chain (kernel level, with the attention split variants), B1 bf16 and
#     fp8 (ms/token, one process each), F, HF F static batch 256 with cuDNN SDPA off (same
#     run: the ratio), F fp8 (fp8 weights and KV cache), L (each boxed).
# Time boxes (s): CHAIN_S 60, PROFILE_S 60, F_S 50, HF_S 60; B1_S 45, F8_S 55, L_S 100
#   (0 skips a step). PART=final needs ~4.5 min (L alone ~80 s).
#   bash benchmarks/gpuperf_wave2c.sh     (repo root; .whl/ carried for the server wheels)
# Results: $OUT/log.txt and one JSON per step under $OUT.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/tessellm-out}; mkdir -p "$OUT"
if [ -d .whl ] && [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
[ -d /tmp/site ] && export PYTHONPATH=/tmp/site:$PWD || export PYTHONPATH=$PWD
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
        [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -i warn | tail -${TAIL:-40}; }
B="python3 -m tessellm.entrypoints.cli --log-level WARNING bench"
L8=benchmarks/model-configs/llama-3.1-8b
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${COMMIT:-unknown}"; date -u
  if [ "${PART:-probe}" = probe ]; then
    box "decode chain + long-context decode attention" ${CHAIN_S:-60} \
      python3 benchmarks/kernels/decode_chain.py --out "$OUT" --sections ${CHAIN_SECTIONS:-chain attn_long}
    TAIL=60 box "profile batch 256" ${PROFILE_S:-60} \
      python3 benchmarks/profile_step.py --batch 256 --steps 10 --output-json "$OUT/profile_b256.json"
    F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256"
    TAIL=3 box F ${F_S:-50} $B $F --max-model-len 4096 --output-json "$OUT/f.json"
    TAIL=3 box "F hf nocudnn" ${HF_S:-60} $B $F --backend hf --hf-batch-size 256 --hf-disable-cudnn-sdpa --output-json "$OUT/f_hf_nocudnn.json"
    for f in f f_hf_nocudnn; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done
  else
    box "decode chain" ${CHAIN_S:-30} python3 benchmarks/kernels/decode_chain.py --out "$OUT" --sections chain
    LAT="$B latency --load-format dummy --max-model-len 4096 --model $L8 --num-iters 2"
    TAIL=2 box "B1 bf16" ${B1_S:-45} $LAT --output-json "$OUT/b1.json"
    TAIL=2 box "B1 fp8" ${B1_S:-45} $LAT --quantization fp8 --output-json "$OUT/b1_fp8.json"
    for f in "$OUT"/b1*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].rsplit('/',1)[1], 'TTFT ms', d['ttft_ms_median'], 'ms/token', d['tpot_ms_median'])" "$f"; done
    F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256"
    TAIL=3 box F ${F_S:-50} $B $F --max-model-len 4096 --output-json "$OUT/f.json"
    TAIL=3 box "F hf nocudnn" ${HF_S:-60} $B $F --backend hf --hf-batch-size 256 --hf-disable-cudnn-sdpa --output-json "$OUT/f_hf_nocudnn.json"
    TAIL=3 box "F fp8" ${F8_S:-55} $B $F --max-model-len 4096 --quantization fp8 --kv-cache-dtype fp8 --output-json "$OUT/f_fp8.json"
    TAIL=3 box L ${L_S:-100} $B throughput --model $L8 --load-format dummy --num-prompts 512 --input-len 1024 --output-len 1024 --max-model-len 4096 --output-json "$OUT/l.json"
    for f in f f_hf_nocudnn f_fp8 l; do [ -f "$OUT/$f.json" ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s', d['elapsed_s'], 's')" "$OUT/$f.json" $f; done
  fi
} 2>&1 | tee "$OUT/log.txt"
