"""Seed-OSS (``SeedOssForCausalLM``: Seed-OSS-36B): the llama decoder with q/k/v biases per
``attention_bias`` (true in the release) and o_proj's per its own ``attention_out_bias``;
``mlp_bias``, ``head_dim`` as Llama's. Dropout (``residual_dropout``) is training only."""

from __future__ import annotations

from tessellm.models.llama import LlamaForCausalLM


class SeedOssForCausalLM(LlamaForCausalLM):
    def attention_biases(self, config) -> tuple[bool, bool]:
        return (bool(getattr(config, "attention_bias", True)),
                bool(getattr(config, "attention_out_bias", False)))
