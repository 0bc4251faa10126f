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
from tessellm.layers.linear import materialize
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape
from tessellm.layers.rotary import RotaryEmbedding
from tessellm.models.decoder import DecoderLayer, DecoderMLP
from tessellm.models.granite_moe import GraniteMoeForCausalLM, GraniteMoeSharedForCausalLM
from tessellm.models.mamba_decoder_layer import MambaDecoderLayer
from tessellm.models.state_space import check_single_device, check_time_step_limit

_MAMBA_TYPES = ("mamba", "linear_attention")
_ATTENTION_TYPES = ("attention", "full_attention")


def granite_mamba_shape(config) -> MambaShape:
    heads, head_dim = config.mamba_n_heads, config.mamba_d_head
    if heads * head_dim != int(config.mamba_expand * config.hidden_size):
        raise ValueError(f"Granite 4.0-H config mamba_n_heads * mamba_d_head ({heads} * {head_dim}) "
                         f"must equal mamba_expand * hidden_size ({config.mamba_expand} * "
                         f"{config.hidden_size}); the config does not describe its Mamba layers.")
    return MambaShape(hidden_size=config.hidden_size, num_heads=heads, head_dim=head_dim,
                      n_groups=config.mamba_n_groups, d_state=config.mamba_d_state,
                      d_conv=config.mamba_d_conv, chunk_size=config.mamba_chunk_size,
                      proj_bias=bool(config.mamba_proj_bias), conv_bias=bool(config.mamba_conv_bias),
                      eps=config.rms_norm_eps,
                      dt_limit=check_time_step_limit(getattr(config, "time_step_limit", None)))


def layer_kinds(config) -> list[str]:
    """Per layer "mamba" or "attention" (the config's own names for either, refused otherwise)."""
    kinds = list(getattr(config, "layers_block_type", None) or config.layer_types)
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"Granite 4.0-H config lists {len(kinds)} layer_types for "
                         f"{config.num_hidden_layers} layers; it needs one per layer.")
    out = []
    for kind in kinds:
        if kind not in _MAMBA_TYPES + _ATTENTION_TYPES:
            raise ValueError(f"Granite 4.0-H layer type {kind!r} is not supported; "
                             f"the types are {_MAMBA_TYPES + _ATTENTION_TYPES}.")
        out.append("mamba" if kind in _MAMBA_TYPES else "attention")
    return out


class GraniteMoeHybridForCausalLM(GraniteMoeSharedForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        check_single_device(ctx)
        self.kinds = layer_kinds(config)
        self.dense = not (getattr(config, "num_local_experts", 0) or 0)
        super().__init__(config, ctx)
        if "attention" not in self.kinds:
            ctx.make_attention_kernel(None)  # the runner's step metadata; no layer attends

    def make_rotary(self, config, head_size: int, ctx: ModelContext):
        if getattr(config, "position_embedding_type", None) != "rope":
            return None  # "nope": the attention layers see no positions but the Mamba layers'
        return RotaryEmbedding.from_config(config, head_size, ctx.ops)

    def make_layer(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        if self.kinds[index] == "attention":
            return super().make_layer(config, ctx, rotary, index)
        return MambaDecoderLayer(MambaMixer2(granite_mamba_shape(config), ctx),
                                 self.make_mlp(config, ctx, index),
                                 lambda: self.make_norm(config, ctx, None),
                                 self.residual_multiplier(config))

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        if self.dense:  # the shared MLP is the layer's MLP
            return DecoderMLP(config, ctx, config.shared_intermediate_size)
        return super().make_mlp(config, ctx, index)

    def attention_layers(self) -> list:
        return [layer.self_attn.attn for layer in self.layers if isinstance(layer, DecoderLayer)]

    def mamba_layers(self) -> list[MambaMixer2]:
        return [layer.mamba for layer in self.layers if isinstance(layer, MambaDecoderLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        if not self.dense:
            return super().load_weights(weights)
        size = self.config.shared_intermediate_size

        def dense_mlp():  # shared_mlp.* -> the plain MLP's gate/up and down projections
            for name, tensor in weights:
                if ".shared_mlp.input_linear.weight" in name:
                    gate, up = materialize(tensor).split([size, size])
                    prefix = name.replace(".shared_mlp.input_linear.weight", ".mlp.")
                    yield prefix + "gate_proj.weight", gate
                    yield prefix + "up_proj.weight", up
                else:
                    yield name.replace(".shared_mlp.output_linear.", ".mlp.down_proj."), tensor

        return GraniteMoeForCausalLM.load_weights(self, dense_mlp())
