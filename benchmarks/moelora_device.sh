#!/usr/bin/env bash
# LoRA on MoE experts (docs/lora.md, "MoE experts") on one GPU, ~4 minutes:
#   1. conformance: LoRAOps.fused_experts_lora of the cuda backend (Triton) against merged-weight
#      oracles (1, 7, 40 tokens; float32 and bf16; expert_map);
#   2. check: tiny Mixtral with two per-expert adapters and the base model in one batch, eager
#      and with decode graphs: float32 tokens equal HF with the adapters merged (no peft needed);
#   3. bench: one Qwen3-30B-A3B-shaped layer (128 experts, top-8, 4 slots of rank 16), the LoRA
#      path against the base fused MoE, graph-timed.
# Run from the repository root: bash benchmarks/moelora_device.sh   (OUT=... for the logs)
# Expect: conformance "4 passed"; check "2 passed"; five MOELORA lines (the LoRA path's cost
# over the base layer; no target yet, the first numbers).
source benchmarks/device_env.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
t conformance ${CONF_S:-150} python3 -m tessellm.testing --backend cuda -q -k "moe_lora"
t check ${CHECK_S:-200} python3 -m pytest -q -p no:cacheprovider tests/lora/test_lora_experts_gpu.py
t bench ${BENCH_S:-120} python3 benchmarks/kernels/bench_moe_lora.py
grep MOELORA "$OUT/bench.txt"
