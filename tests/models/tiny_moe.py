"""Tiny random MoE checkpoints (8 experts, top-2) built from HF configs, never downloaded."""

from __future__ import annotations

import random

import torch

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
              num_experts_per_tok=2)


def moe_configs():
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral": MixtralConfig(**COMMON, intermediate_size=96, num_local_experts=8),
        # Layer 1 is dense (mlp_only_layers); norm_topk_prob False as in Qwen1.5-MoE.
        "qwen2-moe": Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=32,
                                    shared_expert_intermediate_size=64, num_experts=8,
                                    mlp_only_layers=[1], norm_topk_prob=False,
                                    use_sliding_window=False),
        "qwen3-moe": Qwen3MoeConfig(**COMMON, head_dim=32, intermediate_size=96,
                                    moe_intermediate_size=48, num_experts=8, norm_topk_prob=True),
    }


def save_tiny_moe(arch: str, path: str, max_shard_size=None) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(4321)
    model = AutoModelForCausalLM.from_config(moe_configs()[arch], dtype=torch.float32)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(path, **kwargs)
    return path


def prompts(vocab: int = 256) -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(vocab) for _ in range(n)] for n in (3, 21, 50, 9)]
