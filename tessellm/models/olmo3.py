"""OLMo 3 (``Olmo3ForCausalLM``): OLMo 2's layers (``models/olmo2.py``) with sliding-window
layers interleaved with full-attention ones per ``config.layer_types`` (window
``sliding_window``), each layer type with its own rope settings where the config gives them
per type (``rope_parameters["sliding_attention"]`` / ``["full_attention"]``, as transformers 5
reads OLMo 3 configs: e.g. yarn on the full-attention layers only)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.layer_windows import window_by_layer_type
from tessellm.models.olmo2 import Olmo2DecoderLayer, Olmo2ForCausalLM


class Olmo3ForCausalLM(Olmo2ForCausalLM):
    def check_config(self, config) -> None:
        types = getattr(config, "layer_types", None)
        if not types or len(types) != config.num_hidden_layers:
            raise ValueError(f"OLMo 3 config.layer_types={types!r} is not supported: it must "
                             f"name each of the {config.num_hidden_layers} layers' attention.")

    def make_rotary(self, config, head_size: int, ctx: ModelContext) -> dict:
        """One rotary embedding per layer type."""
        return {kind: RotaryEmbedding.from_config(config, head_size, ctx.ops, layer_type=kind,
                                                 max_positions=ctx.max_positions)
                for kind in sorted(set(config.layer_types))}

    def make_layer(self, config, ctx: ModelContext, rotary: dict, index: int) -> nn.Module:
        return Olmo2DecoderLayer(config, ctx, rotary[config.layer_types[index]],
                                 self.layer_window(config, index))

    def layer_window(self, config, index: int) -> Optional[int]:
        return window_by_layer_type(config, index)
