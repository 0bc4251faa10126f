"""IBM Granite 4.0-H (``GraniteMoeHybridForCausalLM``: granite-4.0-h-small / -tiny / -micro):
Granite MoE with a shared MLP (``models/granite_moe.py``) in which most layers replace attention
with a Mamba2 mixer (``models/mamba_decoder_layer.py``)::

    config.layer_types[i]:  "mamba" / "linear_attention"  -> MambaDecoderLayer
                            "attention" / "full_attention" -> DecoderLayer (Granite's scalars)
    every layer's MLP:      experts + shared MLP (num_local_experts > 0), else the shared MLP
                            alone, a dense SwiGLU
    position_embedding_type "rope": rotary attention; anything else ("nope", None): none

Checkpoint names: Granite MoE's (``block_sparse_moe.*``, ``shared_mlp.*``) plus
``layers.{i}.mamba.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}``.
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderMLP
from tessellm.models.granite_moe import GraniteMoeSharedForCausalLM, shared_mlp_names
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.mamba_decoder_layer import HybridLayers
from tessellm.quantization.stored_parts import checkpoint_block_rows, checkpoint_packing


class GraniteMoeHybridForCausalLM(HybridLayers, GraniteMoeSharedForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        self.init_hybrid(config, ctx)
        self.dense = not (getattr(config, "num_local_experts", 0) or 0)
        super().__init__(config, ctx)
        self.finish_hybrid(ctx)

    def is_sparse(self, config, index: int) -> bool:
        return not self.dense

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        if getattr(config, "position_embedding_type", None) != "rope":
            return None  # "nope": the attention layers see no positions but the Mamba layers'
        return RotaryEmbedding.from_config(config, head_size, ctx.ops,
                                           max_positions=ctx.max_positions)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        if self.dense:  # the shared MLP is the layer's MLP
            return DecoderMLP(config, ctx, config.shared_intermediate_size)
        return super().make_mlp(config, ctx, index)

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]
                         ) -> Iterable[tuple[str, torch.Tensor]]:
        if not self.dense:
            return super().checkpoint_names(weights)
        # the shared MLP is the layer's MLP: its fused tensors cut into ``.mlp.*`` (here, where
        # the quantized loader sees them too)
        return shared_mlp_names(LlamaForCausalLM.checkpoint_names(self, weights),
                                self.config.shared_intermediate_size, ".mlp.",
                                checkpoint_block_rows(self.config),
                                checkpoint_packing(self.config))
