"""OLMo (``OlmoForCausalLM``: OLMo-1B-hf, OLMo-7B-hf, OLMo-1.7-7B-hf): the llama decoder with
LayerNorms that have no weight or bias (eps 1e-5, as HF's OlmoLayerNorm) in place of RMSNorm,
and an optional ``clip_qkv``: q, k and v clamped to ``[-clip_qkv, clip_qkv]`` after the
projection. ``attention_bias`` as Llama's (q/k/v/o); the MLP never has one."""

from __future__ import annotations

import math
from typing import Optional

import torch.nn as nn

from tessellm.distributed.parallel_state import TensorParallel
from tessellm.layers.context import ModelContext
from tessellm.layers.layer_norm import LayerNorm
from tessellm.models.llama import LlamaForCausalLM

_EPS = 1e-5  # fixed in HF's OlmoLayerNorm (the config has no eps)


class OlmoForCausalLM(LlamaForCausalLM):
    def make_norm(self, config, ctx: ModelContext, reduce: Optional[TensorParallel]) -> nn.Module:
        return LayerNorm(config.hidden_size, _EPS, reduce=reduce)

    def clip_qkv(self, config) -> Optional[float]:
        clip = getattr(config, "clip_qkv", None)
        return None if clip is None else float(clip)

    def mlp_bias(self, config) -> bool:
        return False

    def check_config(self, config) -> None:
        clip = getattr(config, "clip_qkv", None)
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not math.isfinite(clip) or clip <= 0):
            raise ValueError(f"OLMo config clip_qkv={clip!r} is not supported: it must be null "
                             "or a positive number.")
