"""A hybrid model's Mamba decoder layer (Granite 4.0-H, Bamba): ``DecoderLayer``'s shape with a
Mamba2 mixer where the attention was, so the layers of one model chain the same way::

    layer i:  input_layernorm(h, res) -> mamba -> (* residual_multiplier)
              -> post_attention_layernorm(h, res) -> mlp -> (* residual_multiplier)

Returns ``(hidden, residual)`` like ``DecoderLayer``: the next layer's input norm adds them
(and, under tensor parallelism, sums the MLP's partial output over the ranks, as there).

``HybridLayers`` is what a llama-family model class adds to become a hybrid: the config's
``mamba_*`` sizes (Granite 4.0-H and Bamba name them alike), each layer's kind from
``layers_block_type``, Mamba layers where it says so, and the two lists of layers the runner
asks for (attention layers hold KV cache, Mamba layers hold recurrent state). Under pipeline
parallelism a stage builds, loads and keeps state for its own layers only (llama's
``MissingLayer`` stands in for the others').
"""

from __future__ import annotations

import re
from typing import Callable, Iterable

import torch

import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.layers.mamba_mixer import MambaMixer2, MambaShape
from tessellm.layers.norm import add_and_norm
from tessellm.models.decoder import DecoderLayer
from tessellm.models.llama import MissingLayer
from tessellm.models.state_space import check_time_step_limit

_MAMBA_TYPES = ("mamba", "linear_attention")
_ATTENTION_TYPES = ("attention", "full_attention")
_MAMBA_TENSOR = re.compile(r"(?:model\.)?layers\.(\d+)\.mamba\.(.+)$")


class MambaDecoderLayer(nn.Module):
    def __init__(self, mamba: MambaMixer2, mlp: nn.Module, norm: Callable[..., nn.Module],
                 residual_multiplier: float = 1.0, input_reduce=None):
        """``norm(reduce)`` builds each of the two RMSNorms; ``input_reduce``: the tensor group
        the input norm sums its input over (the previous layer's MLP output is a partial sum
        under tensor parallelism; the mixer's ``out_proj`` sums its own)."""
        super().__init__()
        self.mamba = mamba
        self.mlp = mlp
        self.input_layernorm = norm(input_reduce)
        self.post_attention_layernorm = norm(None)
        self.residual_multiplier = residual_multiplier

    def forward(self, positions, hidden, residual, metadata):
        hidden, residual = add_and_norm(self.input_layernorm, hidden, residual)
        hidden = self.mamba(hidden)
        if self.residual_multiplier != 1.0:
            hidden = hidden * self.residual_multiplier
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        out = self.mlp(hidden)
        if self.residual_multiplier != 1.0:
            out = out * self.residual_multiplier
        return out, residual


def hybrid_mamba_shape(config) -> MambaShape:
    """The Mamba layers' sizes from a hybrid config's ``mamba_*`` fields (Falcon-H1's
    ``mamba_d_ssm``, when set, is the mixer's width in place of ``mamba_expand * hidden``)."""
    heads, head_dim = config.mamba_n_heads, config.mamba_d_head
    d_ssm = getattr(config, "mamba_d_ssm", None)
    width = d_ssm or int(config.mamba_expand * config.hidden_size)
    if heads * head_dim != width:
        what = "mamba_d_ssm" if d_ssm else "mamba_expand * hidden_size"
        raise ValueError(f"The config's mamba_n_heads * mamba_d_head ({heads} * {head_dim}) must "
                         f"equal {what} ({width}); it does not describe its Mamba layers.")
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
        self.kinds = layer_kinds(config)

    def finish_hybrid(self, ctx: ModelContext) -> None:
        if not self.attention_layers():  # none in the model, or in this pipeline stage
            ctx.make_attention_kernel(None)  # the runner's step metadata; no layer attends

    def make_layer(self, config, ctx: ModelContext, rotary, index: int) -> nn.Module:
        if self.kinds[index] == "attention":
            return super().make_layer(config, ctx, rotary, index)
        summed = index == 0 or self.output_summed(config)
        return MambaDecoderLayer(MambaMixer2(hybrid_mamba_shape(config), ctx),
                                 self.make_mlp(config, ctx, index),
                                 lambda reduce: self.make_norm(config, ctx, reduce),
                                 self.residual_multiplier(config), None if summed else ctx.tp)

    def attention_layers(self) -> list:
        return [layer.self_attn.attn for layer in self.layers if isinstance(layer, DecoderLayer)]

    def mamba_layers(self) -> list[MambaMixer2]:
        return [layer.mamba for layer in self.layers if isinstance(layer, MambaDecoderLayer)]

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        loaded: set[str] = set()
        loaded |= super().load_weights(self.load_mamba_tensors(weights, loaded))
        return loaded

    def load_mamba_tensors(self, weights, loaded: set[str]):
        return load_mamba_tensors(self.layers, weights, loaded)


def load_mamba_tensors(layers, weights, loaded: set[str]):
    """Loads the Mamba mixers' tensors (``layers.{i}.mamba.*`` into ``layers[i].mamba``: each
    mixer takes its rank's slices), adding their names to ``loaded``; yields every other
    tensor."""
    for name, tensor in weights:
        match = _MAMBA_TENSOR.match(name)
        if match is None:
            yield name, tensor
            continue
        index = int(match[1])
        if index < len(layers) and isinstance(layers[index], MissingLayer):
            continue  # another pipeline stage's layer
        mixer = getattr(layers[index], "mamba", None) if index < len(layers) else None
        if mixer is None:
            built = (f"builds layer {index} as {type(layers[index]).__name__}"
                     if index < len(layers) else f"has {len(layers)} layers")
            raise ValueError(f"Checkpoint tensor {name!r} belongs to a Mamba layer, but the "
                             f"config {built}; its layer types do not match the weights.")
        mixer.load_checkpoint_tensor(match[2], tensor)
        loaded.add(f"layers.{match[1]}.mamba.{match[2]}")
