"""A hybrid model's Mamba decoder layer (Granite 4.0-H, Bamba): ``DecoderLayer``'s shape with a
Mamba2 mixer where the attention was, so the layers of one model chain the same way::

    layer i:  input_layernorm(h, res) -> mamba -> (* residual_multiplier)
              -> post_attention_layernorm(h, res) -> mlp -> (* residual_multiplier)

Returns ``(hidden, residual)`` like ``DecoderLayer``: the next layer's input norm adds them.
One device only (``models/state_space.py``), so no norm sums over tensor ranks.

``HybridLayers`` is what a llama-family model class adds to become a hybrid: the config's
``mamba_*`` sizes (Granite 4.0-H and Bamba name them alike), each layer's kind from
``layers_block_type``, Mamba layers where it says so, and the two lists of layers the runner
asks for (attention layers hold KV cache, Mamba layers hold recurrent state).
"""

from __future__ import annotations

from typing import Callable

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape
from tessellm.models.decoder import DecoderLayer
from tessellm.models.state_space import check_single_device, check_time_step_limit

_MAMBA_TYPES = ("mamba", "linear_attention")
_ATTENTION_TYPES = ("attention", "full_attention")


class MambaDecoderLayer(nn.Module):
    def __init__(self, mamba: MambaMixer2, mlp: nn.Module, norm: Callable[[], nn.Module],
                 residual_multiplier: float = 1.0):
        """``norm()`` builds each of the two RMSNorms."""
        super().__init__()
        self.mamba = mamba
        self.mlp = mlp
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.residual_multiplier = residual_multiplier

    def forward(self, positions, hidden, residual, metadata):
        if residual is None:
            residual, hidden = hidden, self.input_layernorm(hidden)
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.mamba(hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        out = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return out, residual


def hybrid_mamba_shape(config) -> MambaShape:
    """The Mamba layers' sizes from a hybrid config's ``mamba_*`` fields."""
    heads, head_dim = config.mamba_n_heads, config.mamba_d_head
    if heads * head_dim != int(config.mamba_expand * config.hidden_size):
        raise ValueError(f"The config's mamba_n_heads * mamba_d_head ({heads} * {head_dim}) must "
                         f"equal mamba_expand * hidden_size ({config.mamba_expand} * "
                         f"{config.hidden_size}); it does not describe its Mamba layers.")
    return MambaShape(hidden_size=config.hidden_size, num_heads=heads, head_dim=head_dim,
                      n_groups=config.mamba_n_groups, d_state=config.mamba_d_state,
                      d_conv=config.mamba_d_conv, chunk_size=config.mamba_chunk_size,
                      proj_bias=bool(config.mamba_proj_bias), conv_bias=bool(config.mamba_conv_bias),
                      eps=config.rms_norm_eps,
                      dt_limit=check_time_step_limit(getattr(config, "time_step_limit", None)))


def layer_kinds(config) -> list[str]:
    """Per layer "mamba" or "attention" (the config's names for either; refused otherwise)."""
    kinds = list(getattr(config, "layers_block_type", None) or config.layer_types)
    if len(kinds) != config.num_hidden_layers:
        raise ValueError(f"The config lists {len(kinds)} layer types for "
                         f"{config.num_hidden_layers} layers; it needs one per layer.")
    for kind in kinds:
        if kind not in _MAMBA_TYPES + _ATTENTION_TYPES:
            raise ValueError(f"Layer type {kind!r} is not supported in a hybrid Mamba model; "
                             f"the types are {_MAMBA_TYPES + _ATTENTION_TYPES}.")
    return ["mamba" if kind in _MAMBA_TYPES else "attention" for kind in kinds]


class HybridLayers:
    """Mixed into a ``LlamaForCausalLM`` subclass (before it): call ``init_hybrid`` before the
    llama constructor builds the layers, and ``finish_hybrid`` after it."""

    def init_hybrid(self, config, ctx: ModelContext) -> None:
        check_single_device(ctx)
        self.kinds = layer_kinds(config)

    def finish_hybrid(self, ctx: ModelContext) -> None:
        if "attention" not in self.kinds:
            ctx.make_attention_kernel(None)  # the runner's step metadata; no layer attends

    def make_layer(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        if self.kinds[index] == "attention":
            return super().make_layer(config, ctx, rotary, index)
        return MambaDecoderLayer(MambaMixer2(hybrid_mamba_shape(config), ctx),
                                 self.make_mlp(config, ctx, index),
                                 lambda: self.make_norm(config, ctx, None),
                                 self.residual_multiplier(config))

    def attention_layers(self) -> list:
        return [layer.self_attn.attn for layer in self.layers if isinstance(layer, DecoderLayer)]

    def mamba_layers(self) -> list[MambaMixer2]:
        return [layer.mamba for layer in self.layers if isinstance(layer, MambaDecoderLayer)]
