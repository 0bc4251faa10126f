"""Gemma (1): ``GemmaForCausalLM``, Gemma 2B/7B and CodeGemma.

The llama decoder (``decoder.py``: two pre-norms a layer, fused q/k/v, rotary, full attention)
with the Gemma pieces of ``gemma_decoder.py``: embeddings scaled by ``sqrt(hidden_size)``,
``1 + w`` RMSNorms, and a GeGLU MLP. The activation is ``hidden_act``: the released configs say
"gelu", which HF's GemmaConfig reads as the tanh approximation (so do we).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.gemma_decoder import GELU_TANH, GemmaMLP, embed_scale, shifted_norms
from tessellm.models.llama import LlamaForCausalLM


class GemmaForCausalLM(LlamaForCausalLM):
    def __init__(self, config, ctx: ModelContext):
        super().__init__(config, ctx)
        self.embedding_multiplier = embed_scale(config.hidden_size, ctx.dtype)

    def make_mlp(self, config, ctx: ModelContext, index: int) -> nn.Module:
        # unreduced: the next layer's input_layernorm (or the final norm) sums it over the ranks
        return GemmaMLP(config, ctx, reduce_output=False)

    def check_config(self, config) -> None:
        act = getattr(config, "hidden_act", None) or "gelu_pytorch_tanh"
        if act not in GELU_TANH + ("gelu",):
            raise ValueError(f"Gemma hidden_act {act!r} is not supported; only "
                             "gelu_pytorch_tanh (or its legacy name gelu) is.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; every ``*norm.weight`` ``w`` loads as ``1 + w``."""
        return super().load_weights(shifted_norms(weights))
