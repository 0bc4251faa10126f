"""Write random PEFT LoRA adapters for a model config, with safetensors only (no peft needed).

    python benchmarks/lora_adapters.py --config benchmarks/model-configs/llama-3.1-8b \
        --out /tmp/adapters --num 16 --rank 16

Each adapter ``a0 .. a{num-1}`` adapts every q/k/v/o and gate/up/down projection of every layer
(``adapter_config.json`` + ``adapter_model.safetensors``, PEFT's key names), with small random
A and B (B nonzero, so an adapter changes the output), in bf16.
"""

from __future__ import annotations

import argparse
import json
import os

import torch
from safetensors.torch import save_file
from transformers import AutoConfig

MODULES = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn",
           "o_proj": "self_attn", "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def module_shapes(config) -> dict:
    hidden, heads = config.hidden_size, config.num_attention_heads
    head = getattr(config, "head_dim", None) or hidden // heads
    kv = (getattr(config, "num_key_value_heads", None) or heads) * head
    inter = config.intermediate_size
    return {"q_proj": (hidden, heads * head), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (heads * head, hidden), "gate_proj": (hidden, inter),
            "up_proj": (hidden, inter), "down_proj": (inter, hidden)}


def write_adapter(path: str, config, rank: int, seed: int, dtype=torch.bfloat16) -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"  # random numbers are faster there
    gen = torch.Generator(device).manual_seed(seed)
    tensors = {}
    for layer in range(config.num_hidden_layers):
        for module, (fan_in, fan_out) in module_shapes(config).items():
            key = f"base_model.model.model.layers.{layer}.{MODULES[module]}.{module}"
            a = torch.randn(rank, fan_in, generator=gen, device=device) / fan_in ** 0.5
            b = torch.randn(fan_out, rank, generator=gen, device=device) * 0.01
            tensors[f"{key}.lora_A.weight"] = a.to(dtype).cpu().contiguous()
            tensors[f"{key}.lora_B.weight"] = b.to(dtype).cpu().contiguous()
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
    with open(os.path.join(path, "adapter_config.json"), "w") as f:
        json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank,
                   "target_modules": sorted(MODULES), "lora_dropout": 0.0, "bias": "none",
                   "use_rslora": False, "use_dora": False, "task_type": "CAUSAL_LM"}, f, indent=1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", required=True, help="a model directory (config.json)")
    p.add_argument("--out", required=True)
    p.add_argument("--num", type=int, default=16)
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()
    config = AutoConfig.from_pretrained(args.config)
    for i in range(args.num):
        write_adapter(os.path.join(args.out, f"a{i}"), config, args.rank, seed=i)
    print(f"wrote {args.num} rank-{args.rank} adapters to {args.out}")


if __name__ == "__main__":
    main()
