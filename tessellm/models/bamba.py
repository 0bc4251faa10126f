"""IBM Bamba (``BambaForCausalLM``: Bamba-9B): the llama decoder in which most layers replace
attention with a Mamba2 mixer (``models/mamba_decoder_layer.py``); attention layers at
``attn_layer_indices`` (``config.layers_block_type``), with partial rotary
(``partial_rotary_factor``, NeoX style over the first dims of each head); every layer's MLP a
SwiGLU.

Checkpoint names are llama's but for the MLP and its norm, renamed on load::

    layers.{i}.feed_forward.{gate,up,down}_proj   -> layers.{i}.mlp.*
    layers.{i}.pre_ff_layernorm                   -> layers.{i}.post_attention_layernorm
    final_layernorm                               -> norm
    layers.{i}.mamba.{in_proj, conv1d, dt_bias, A_log, D, norm, out_proj}
"""

from __future__ import annotations

from typing import Iterable

import torch

from tessellm.layers.context import ModelContext
from tessellm.models.llama import LlamaForCausalLM
from tessellm.models.mamba_decoder_layer import HybridLayers


class BambaForCausalLM(HybridLayers, LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        self.init_hybrid(config, ctx)
        super().__init__(config, ctx)
        self.finish_hybrid(ctx)

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise ValueError(f"Bamba hidden_act {act!r} is not supported; only silu is.")

    def checkpoint_names(self, weights: Iterable[tuple[str, torch.Tensor]]):
        return bamba_names(weights)


def bamba_names(weights: Iterable[tuple[str, torch.Tensor]]):
    """Bamba's (and Falcon-H1's) MLP and norm names as llama's (module docstring); llama names
    pass unchanged."""
    for name, tensor in weights:
        yield (name.replace(".feed_forward.", ".mlp.")
               .replace(".pre_ff_layernorm.", ".post_attention_layernorm.")
               .replace("model.final_layernorm.", "model.norm.")), tensor
