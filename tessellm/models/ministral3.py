"""Ministral 3 (``Ministral3ForCausalLM``; the language model of the Ministral 3 checkpoints,
``Mistral3ForConditionalGeneration`` with a ``ministral3`` text config): Mistral with YaRN
rotary and Llama 4's attention temperature, from ``rope_parameters``::

    q  *=  1 + llama_4_scaling_beta * log(1 + floor(position / original_max_position_embeddings))

per token, after the projection (a scalar per token: it commutes with the rotation, so a
kernel that fuses rotary still does). Below ``original_max_position_embeddings`` positions
the factor is 1. HF's ``Ministral3Attention`` and vLLM compute the same.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.layers.context import ModelContext
from tessellm.models.decoder import DecoderAttention
from tessellm.models.llama import MistralForCausalLM


class Ministral3Attention(DecoderAttention):
    def __init__(self, config, ctx: ModelContext, rotary, window: Optional[int]):
        super().__init__(config, ctx, rotary, qkv_bias=False, qk_norm=False, window=window)
        params = config.rope_parameters or {}
        self.beta = params.get("llama_4_scaling_beta")
        self.original = params.get("original_max_position_embeddings")
        if self.beta is not None and not self.original:
            raise ValueError("Ministral 3's rope_parameters have llama_4_scaling_beta but no "
                             "original_max_position_embeddings; is the config complete?")

    def forward(self, positions, hidden, metadata):
        if not self.beta:
            return super().forward(positions, hidden, metadata)
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        scale = 1 + self.beta * torch.log1p(torch.floor(positions.float() / self.original))
        t = q.shape[0]
        q = (q.view(t, -1, self.head_size) * scale.to(q.dtype)[:, None, None]).view(t, -1)
        if self.fuse_rotary:
            out = self.attn(q, k, v, metadata, positions, self.rotary.cos_sin_cache)
        else:
            q, k = self.rotary(positions, q, k)
            out = self.attn(q, k, v, metadata)
        return self.o_proj(out)


class Ministral3ForCausalLM(MistralForCausalLM):
    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Ministral3Attention:
        return Ministral3Attention(config, ctx, rotary, self.layer_window(config, index))
