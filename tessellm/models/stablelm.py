"""StableLM (``StableLmForCausalLM``: StableLM-3B-4E1T, StableLM 2 1.6B, StableLM Zephyr): the
llama decoder with LayerNorms that have a weight and a bias (``layer_norm_eps``), q/k/v biases
per ``use_qkv_bias`` (o_proj never has one) and partial rotary (``partial_rotary_factor``,
0.25 by default: the rotary reads it from the config).

Not implemented, refused at load: ``qk_layernorm`` and ``use_parallel_residual`` (only
StableLM 2 12B sets them)."""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.models.llama import LlamaForCausalLM


class StableLmForCausalLM(LlamaForCausalLM):
    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, config.layer_norm_eps, reduce=reduce,
                         has_weight=True, has_bias=True)

    def attention_biases(self, config) -> tuple[bool, bool]:
        return bool(getattr(config, "use_qkv_bias", False)), False

    def mlp_bias(self, config) -> bool:
        return False

    def check_config(self, config) -> None:
        for name in ("qk_layernorm", "use_parallel_residual"):
            if getattr(config, name, False):
                raise ValueError(f"StableLM config {name}=True (StableLM 2 12B) is not supported "
                                 "yet; StableLM models with it false load.")
