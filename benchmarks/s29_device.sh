#!/usr/bin/env bash
# Session 29, call 1 (one GPU, <= 9.5 min): the GPU tests of what landed (bnb MoE, bnb, custom
# logits processors, structured output apply), then engine B1 / F of this tree (the sampler /
# step changes of the NaN count landed since session 28's B1 5.26 ms a token on an H100), then B1
# on Qwen3-30B-A3B shapes with NF4 experts on load against bf16.
source benchmarks/device_env.sh
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-bnb/*.whl
unset TRITON_INTERPRET; export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRITON_CACHE_DIR=/tmp/s29-triton
nvidia-smi --query-gpu=name --format=csv,noheader; git log --oneline -1 2>/dev/null || true
P="python3 -m pytest -q -p no:cacheprovider -rfE -m gpu"
t gpu_bnbmoe ${MOE_T:-120} $P tests/quantization/test_bnb_moe.py
t gpu_bnb ${BNB_T:-100} $P tests/quantization/test_bnb.py
t gpu_lp ${LP_T:-60} $P tests/sampling/test_logits_processors_cuda.py tests/structured_output/test_apply.py
B1="latency --model $L8 --load-format dummy --input-len 512 --output-len 256 --num-iters 3"
F="throughput --model $L8 --load-format dummy --num-prompts 256 --input-len 512 --output-len 256"
t b1_new ${B1_T:-60} $B $B1 --output-json $OUT/b1_new.json
t f_new ${F_T:-100} $B $F --output-json $OUT/f_new.json
for f in b1_new; do [ -f $OUT/$f.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'tpot', d['tpot_ms_median'], 'ttft', d['ttft_ms_median'])" $OUT/$f.json $f; done
for f in f_new; do [ -f $OUT/$f.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], d['output_tokens_per_s'], 'tok/s')" $OUT/$f.json $f; done
M=benchmarks/model-configs/qwen3-30b-a3b
t moe_bnb ${MOEB_T:-150} $B latency --model $M --load-format dummy --input-len 512 --output-len 128 --num-iters 2 --quantization bitsandbytes --output-json $OUT/moe_b1_bnb.json
t moe_bf16 ${MOEB_T:-120} $B latency --model $M --load-format dummy --input-len 512 --output-len 128 --num-iters 2 --output-json $OUT/moe_b1_bf16.json
for f in moe_b1_bnb moe_b1_bf16; do [ -f $OUT/$f.json ] && python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[2], 'tpot', d['tpot_ms_median'], 'ttft', d['ttft_ms_median'])" $OUT/$f.json $f; done
exit 0
