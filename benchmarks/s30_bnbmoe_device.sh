#!/usr/bin/env bash
# Session 30 (one GPU, ~7 min): bitsandbytes 4-bit MoE experts read packed by the fused MoE
# (keyword bnb4_code: kernels/moe/decode_bnb4.py at decode, bnb4_dequant.py beyond).
#   1. the GPU tests of bnb MoE (kernels vs the reference, Qwen3-30B-A3B-sized experts; the
#      engine on tiny Mixtral / Qwen3-MoE bnb checkpoints against HF's tokens)
#   2. one Qwen3-30B-A3B layer: fused bnb4 vs the dense path vs bf16 at 1-64 tokens, and the
#      decode kernels' rows a program (benchmarks/kernels/bench_moe_bnb4.py)
#   3. engine B1 on Qwen3-30B-A3B shapes with NF4 dummy experts: fused, then the dense path
#      (TESSELLM_BNB_MOE_FUSED=0; session 29: did not finish in 150 s before its fixes), then
#      bf16 (3.158 ms/token in session 29)
# Results under $OUT: *.txt logs, kbench.json, moe_b1_{fused,dense,bf16}.json.
source benchmarks/device_env.sh
[ -d .whl-bnb ] && python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
t bnbgpu ${BNB_S:-100} python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/kernels/test_moe_bnb4.py tests/quantization/test_bnb_moe.py
TAIL_T=12 t kbench ${KB_S:-75} python3 benchmarks/kernels/bench_moe_bnb4.py --json $OUT/kbench.json
grep '^{' $OUT/kbench.txt
M=/tmp/qwen3-30b-a3b-bnb; python3 benchmarks/bnb_prequantized_config.py benchmarks/model-configs/qwen3-30b-a3b $M
LAT="latency --load-format dummy --input-len 512 --output-len 128 --num-iters 2"
t moe_b1_fused ${FUSED_S:-100} $B $LAT --model $M --output-json $OUT/moe_b1_fused.json
TESSELLM_BNB_MOE_FUSED=0 t moe_b1_dense ${DENSE_S:-110} $B $LAT --model $M --output-json $OUT/moe_b1_dense.json
t moe_b1_bf16 ${BF16_S:-70} $B $LAT --model benchmarks/model-configs/qwen3-30b-a3b --output-json $OUT/moe_b1_bf16.json
for f in moe_b1_fused moe_b1_dense moe_b1_bf16; do [ -f $OUT/$f.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'tpot', d['tpot_ms_median'], 'ttft', d['ttft_ms_median'])" $OUT/$f.json $f; done
for f in moe_b1_fused moe_b1_dense; do echo "--- $f"; grep -v -i warn $OUT/$f.txt | tail -3; done
exit 0
