"""ERNIE 4.5 dense (``Ernie4_5ForCausalLM``: ERNIE-4.5-0.3B): the llama decoder with

- rotary on interleaved pairs ``(x[2i], x[2i+1])`` of the whole head, served by the NeoX
  kernels through a reordering of q and k (``interleaved_rotary.py``);
- one ``use_bias`` for q/k/v/o and the MLP's gate/up/down (the LM head has none);
- ``head_dim`` (128) and ``tie_word_embeddings`` (true) from the config.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.interleaved_rotary import InterleavedRotaryAttention
from tessellm.models.llama import LlamaForCausalLM


class Ernie4_5ForCausalLM(LlamaForCausalLM):
    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        bias = self.mlp_bias(config)
        return InterleavedRotaryAttention(config, ctx, rotary, qkv_bias=bias, qk_norm=False,
                                          o_bias=bias)

    def attention_biases(self, config) -> tuple[bool, bool]:
        return self.mlp_bias(config), self.mlp_bias(config)

    def mlp_bias(self, config) -> bool:
        return bool(getattr(config, "use_bias", False))
