"""Hunyuan dense (``HunYuanDenseV1ForCausalLM``: Hunyuan-0.5B/1.8B/4B/7B): the llama decoder
with q and k RMS-normed per head *after* rotary (``query_layernorm`` / ``key_layernorm``; Qwen3
norms before), and the NTK-alpha rope: ``rope_type`` "dynamic" with an ``alpha`` stretches the
base once, ``rope_theta * alpha ** (head_dim / (head_dim - 2))``, for every position (HF's
``ntk_alpha``), with no further dependence on the sequence length."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.rope_config import rope_parameters
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.checkpoint_rename import llama_form
from tessellm.models.decoder import DecoderAttention
from tessellm.models.llama import LlamaForCausalLM

_RENAMES = ((".self_attn.query_layernorm.", ".self_attn.q_norm."),
            (".self_attn.key_layernorm.", ".self_attn.k_norm."))


class NormAfterRotaryAttention(DecoderAttention):
    """Per-head q/k RMSNorm after rotary (no rotary fused into the kernel's cache write)."""

    def forward(self, positions, hidden, metadata):
        q, k, v = self.qkv_proj(hidden).split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q, k = self.norm_qk(*self.rotary(positions, q, k))
        return self.o_proj(self.attn(q, k, v, metadata))


class HunYuanDenseV1ForCausalLM(LlamaForCausalLM):
    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        bias = self.attention_biases(config)[0]
        return NormAfterRotaryAttention(config, ctx, rotary, qkv_bias=bias, qk_norm=True,
                                        o_bias=bias)

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        params = rope_parameters(config)
        alpha = params.get("alpha")
        if params["rope_type"] == "dynamic" and alpha:
            theta = params["rope_theta"] * float(alpha) ** (head_size / (head_size - 2))
            params = {"rope_type": "default", "rope_theta": theta,
                      "partial_rotary_factor": params["partial_rotary_factor"]}
        return RotaryEmbedding.from_config(config, head_size, ctx.ops, params=params,
                                           max_positions=ctx.max_positions)

    def mlp_bias(self, config) -> bool:
        return False

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        return ((llama_form(name, (), _RENAMES), tensor) for name, tensor in weights)
