"""GLM-4 (``GlmForCausalLM``: glm-4-9b(-chat)-hf, GLM-Edge) and GLM-4-0414
(``Glm4ForCausalLM``: GLM-4-9B/32B-0414, GLM-Z1): the llama decoder with

- gate and up fused in the checkpoint's ``mlp.gate_up_proj`` (cut on load as Phi-3's);
- q/k/v biases per ``attention_bias`` (o_proj never has one);
- rotary on interleaved pairs of each head's first ``partial_rotary_factor`` (0.5) dims,
  served by the NeoX kernels through a reordering of q and k (``interleaved_rotary.py``);
- GLM-4-0414 only: a norm after each sublayer too, before its residual add::

      h = h + post_self_attn_layernorm(attn(input_layernorm(h)))
      h = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))

  The post norms need whole rows, so o_proj and down_proj sum their outputs over the tensor
  ranks themselves.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.norm import RMSNorm, add_and_norm
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderMLP
from tessellm.models.interleaved_rotary import InterleavedRotaryAttention
from tessellm.models.phi3 import Phi3ForCausalLM


class GlmAttention(InterleavedRotaryAttention):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                 reduce_output: bool = False):
        super().__init__(config, ctx, rotary, qkv_bias=bool(getattr(config, "attention_bias",
                                                                      False)),
                         qk_norm=False, o_bias=False, reduce_output=reduce_output)


class GlmForCausalLM(Phi3ForCausalLM):
    """Phi-3's loading (the fused ``gate_up_proj`` cut into gate and up) without its window."""

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        return GlmAttention(config, ctx, rotary)

    def layer_window(self, config, index: int) -> Optional[int]:
        return None

    def check_config(self, config) -> None:
        pass  # Phi-3's LongRoPE note does not apply


class Glm4DecoderLayer(nn.Module):
    def __init__(self, config, ctx: ModelContext, rotary: RotaryEmbedding):
        super().__init__()
        eps, hidden = config.rms_norm_eps, config.hidden_size
        self.self_attn = GlmAttention(config, ctx, rotary, reduce_output=True)
        self.mlp = DecoderMLP(config, ctx, reduce_output=True)
        self.input_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_self_attn_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_attention_layernorm = RMSNorm(hidden, eps, ctx.ops)
        self.post_mlp_layernorm = RMSNorm(hidden, eps, ctx.ops)

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.post_self_attn_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.post_mlp_layernorm(self.mlp(hidden)), residual


class Glm4ForCausalLM(GlmForCausalLM):
    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        return Glm4DecoderLayer(config, ctx, rotary)

    def output_summed(self, config) -> bool:
        return True  # down_proj sums (post_mlp_layernorm needs whole rows)
