"""EXAONE 4.0 (``Exaone4ForCausalLM``): OLMo 2's layers (norms after each sublayer, before its
residual add: ``olmo2.py``) with Qwen3's per-head q/k RMSNorm, and, when ``sliding_window`` is
set, sliding-window layers interleaved with global ones per ``layer_types`` where only the
sliding layers rotate q and k (the global ones are NoPE). Without ``sliding_window`` every
layer is global and rotated (EXAONE 4.0 1.2B)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderAttention
from tessellm.models.layer_windows import window_by_layer_type
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.olmo2 import Olmo2DecoderLayer


class Exaone4ForCausalLM(LlamaForCausalLM):
    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        window = self.layer_window(config, index)
        rotates = getattr(config, "sliding_window", None) is None or window is not None
        # the post norm needs whole rows: o_proj sums its output itself
        attention = DecoderAttention(config, ctx, rotary if rotates else None, qkv_bias=False,
                                     qk_norm=True, window=window, reduce_output=True)
        return Olmo2DecoderLayer(config, ctx, rotary, window, attention=attention)

    def output_summed(self, config) -> bool:
        return True  # down_proj sums (post_feedforward_layernorm needs whole rows)

    def mlp_bias(self, config) -> bool:
        return False

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)

    def check_config(self, config) -> None:
        types = getattr(config, "layer_types", None)
        if not types or len(types) != config.num_hidden_layers:
            raise ValueError(f"EXAONE 4 config layer_types={types!r} is not supported: it must "
                             f"name each of the {config.num_hidden_layers} layers' attention.")
