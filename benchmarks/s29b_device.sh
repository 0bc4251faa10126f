#!/usr/bin/env bash
# Session 29, call 2 (one GPU): bnbgemv2_device.sh (the bnb 4-bit GEMV variants checked and
# swept), then B1 on Qwen3-30B-A3B shapes with pre-quantized NF4 experts (dummy 4-bit weights:
# the config gains a bitsandbytes quantization_config) against bf16 (3.158 ms in call 1).
SWEEP_S=${SWEEP_S:-300} BNB_S=${BNB_S:-90} bash benchmarks/bnbgemv2_device.sh
source benchmarks/device_env.sh
M=/tmp/qwen3-30b-a3b-bnb; python3 benchmarks/bnb_prequantized_config.py benchmarks/model-configs/qwen3-30b-a3b $M
t moe_bnb ${MOEB_T:-150} $B latency --model $M --load-format dummy --input-len 512 --output-len 128 --num-iters 2 --output-json $OUT/moe_b1_bnb.json
[ -f $OUT/moe_b1_bnb.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print('moe_b1_bnb tpot', d['tpot_ms_median'], 'ttft', d['ttft_ms_median'])" $OUT/moe_b1_bnb.json
tail -5 $OUT/moe_bnb.txt
exit 0
