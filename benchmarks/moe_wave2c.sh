#!/usr/bin/env bash
# Issue 24 on one H200, Qwen3-30B-A3B shapes, random bf16 weights, every step time-boxed:
#   1. one MoE layer (benchmarks/kernels/moe_decode_probe.py): decode-path tile sweep at 1 token;
#      decode path vs grouped path at 1/2/4/8 tokens; the contract entry vs the reference loop at
#      1/64/4096 tokens                                                        -> moe_layer.json
#   2. one engine (benchmarks/moe_engine.py): B1 (512 in, 256 out), the batch-1 decode graph's
#      GPU time and kernel table, then F (256 x 512 in / 256 out)  -> b1_moe.json, b1_profile.json,
#      f_moe.json
#   3. HF transformers static batch on F's shapes (benchmarks/moe_hf.py, batch HF_BATCH, its
#      default sdpa attention and experts implementation)                      -> f_moe_hf.json
# Time boxes (seconds; 0 skips): LAYER_S 40, ENGINE_S 85, HF_S 40 (HF writes its per-step rate
# every 8 steps, so a cut run still gives prefill + decode step: estimated tok/s, marked).
#   bash benchmarks/moe_wave2c.sh     (repo root; .whl/ and tessellm.egg-info carried, as speed_device.sh)
# Results: $OUT/*.json and $OUT/log.txt.
set -u
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
. benchmarks/device_env.sh  # $OUT, the wheels in .whl/, PYTHONPATH
M=benchmarks/model-configs/qwen3-30b-a3b
box() { local name=$1 secs=$2; shift 2; echo "=== $name (limit ${secs} s) $(date -u +%T)";
        [ "$secs" -gt 0 ] && timeout "$secs" "$@" 2>&1 | grep -v -i warn; }
{
  nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader
  echo "commit ${COMMIT:-$(git log -1 --format=%H 2>/dev/null)}"
  python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
  box "moe layer" ${LAYER_S:-40} python3 benchmarks/kernels/moe_decode_probe.py --out "$OUT/moe_layer.json"
  if [ -f "$OUT/moe_layer.json" ]; then  # the layer sweep's best decode tiles and token limit
    eval "$(python3 -c "import json,sys; d=json.load(open(sys.argv[1])); r=d.get('best_rows'); t=d.get('best_max_tokens'); q=d.get('best_route'); print((f'export TESSELLM_MOE_DECODE_ROWS={r}; ' if r else '') + (f'export TESSELLM_MOE_DECODE_MAX_TOKENS={t}; ' if t is not None else '') + (f'export TESSELLM_MOE_DECODE_ROUTE={q}' if q is not None else ''))" "$OUT/moe_layer.json")"
    echo "engine with TESSELLM_MOE_DECODE_ROWS=${TESSELLM_MOE_DECODE_ROWS:-default} TESSELLM_MOE_DECODE_MAX_TOKENS=${TESSELLM_MOE_DECODE_MAX_TOKENS:-default} TESSELLM_MOE_DECODE_ROUTE=${TESSELLM_MOE_DECODE_ROUTE:-default}"
  fi
  box "engine: B1, profile, F" ${ENGINE_S:-85} python3 benchmarks/moe_engine.py --model $M --out "$OUT" --b1-iters ${B1_ITERS:-2}
  box "HF F" ${HF_S:-40} python3 benchmarks/moe_hf.py --model $M --out "$OUT/f_moe_hf.json" --batch ${HF_BATCH:-256}
  echo "=== end $(date -u +%T)"
} 2>&1 | tee "$OUT/log.txt"
