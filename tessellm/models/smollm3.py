"""SmolLM3 (``SmolLM3ForCausalLM``): the llama decoder (Qwen2's mask and rope) with NoPE
layers: ``no_rope_layers[i]`` 0 leaves layer ``i``'s q and k unrotated (every fourth layer by
default, ``no_rope_layer_interval``); a layer slides only when ``use_sliding_window`` and its
``layer_types`` entry says ``sliding_attention``."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.layer_windows import window_by_layer_type
from tessellm.models.llama import LlamaForCausalLM


class SmolLM3ForCausalLM(LlamaForCausalLM):
    """Llama's switches (``attention_bias``, ``mlp_bias``)."""

    def make_layer(self, config, ctx: ModelContext, rotary: RotaryEmbedding,
                   index: int) -> nn.Module:
        use_rope = config.no_rope_layers[index]
        return super().make_layer(config, ctx, rotary if use_rope else None, index)

    def layer_window(self, config, index: int) -> Optional[int]:
        if not getattr(config, "use_sliding_window", False):
            return None
        return window_by_layer_type(config, index)

    def check_config(self, config) -> None:
        layers = getattr(config, "no_rope_layers", None)
        if layers is None or len(layers) != config.num_hidden_layers:
            raise ValueError(f"SmolLM3 config no_rope_layers={layers!r} is not supported: it "
                             f"must list 0 or 1 for each of the {config.num_hidden_layers} layers.")
