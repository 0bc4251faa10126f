#!/usr/bin/env bash
# Session 29, call 3 (one GPU, ~5 min): the bnb GEMV's GPU tests with the swept GEMV_CONFIGS, engine
# B1 on Llama-3.1-8B shapes with NF4 on load against bf16 (session 28: 5.28 vs 5.26 ms), and B1
# on Qwen3-30B-A3B shapes with pre-quantized NF4 dummy experts (now random codes drawn at once,
# dequantized a chunk of experts a pass: the first tries, quantizing dummy experts one by one,
# took > 150 s) against bf16 (3.158 ms in call 1).
source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
t bnbgpu ${BNB_S:-90} python3 -m pytest -q -p no:cacheprovider -rfE -m gpu tests/quantization/test_bnb.py tests/quantization/test_bnb_moe.py
B1="latency --model $L8 --load-format dummy --input-len 512 --output-len 256 --num-iters 3"
t b1_bnb ${B1_S:-90} $B $B1 --quantization bitsandbytes --output-json $OUT/b1_bnb.json
t b1_bf16 ${B1_S:-60} $B $B1 --output-json $OUT/b1_bf16.json
M=/tmp/qwen3-30b-a3b-bnb; python3 benchmarks/bnb_prequantized_config.py benchmarks/model-configs/qwen3-30b-a3b $M
t moe_bnb ${MOEB_S:-120} $B latency --model $M --load-format dummy --input-len 512 --output-len 128 --num-iters 2 --output-json $OUT/moe_b1_bnb.json
for f in b1_bnb b1_bf16 moe_b1_bnb; do [ -f $OUT/$f.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'tpot', d['tpot_ms_median'], 'ttft', d['ttft_ms_median'])" $OUT/$f.json $f; done
grep -v -i warn $OUT/moe_bnb.txt | tail -4
exit 0
