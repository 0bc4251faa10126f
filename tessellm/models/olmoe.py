"""OLMoE (``OlmoeForCausalLM``: OLMoE-1B-7B): the llama decoder's pre-norm layers with OLMo 2's
attention (q/k RMSNorm over all heads at once, ``models/olmo2.py``) and sparse MoE MLPs
(``models/moe.py``: softmax top-k, renormalized per ``norm_topk_prob``; experts
``mlp.experts.<e>.gate_proj|up_proj|down_proj``, router ``mlp.gate``)."""

from __future__ import annotations

from typing import Iterable, Optional

import torch
import torch.nn as nn

from tessellm.layers.context import ModelContext
from tessellm.models.moe import _MoeForCausalLM
from tessellm.models.olmo2 import Olmo2Attention
from tessellm.models.qk_norm_weights import local_qk_norm_weights


class OlmoeForCausalLM(_MoeForCausalLM):
    def expert_size(self, config) -> int:
        return config.intermediate_size

    def make_attention(self, config, ctx: ModelContext, rotary, index: int) -> Optional[nn.Module]:
        return Olmo2Attention(config, ctx, rotary)

    def check_config(self, config) -> None:
        clip = getattr(config, "clip_qkv", None)
        if clip is not None:
            raise ValueError(f"OLMoE config clip_qkv={clip!r} is not supported yet (OLMoE clamps "
                             "after the q/k norms); use a checkpoint with clip_qkv null.")

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """HF names; each ``q_norm`` / ``k_norm`` weight is cut to this rank's heads."""
        return super().load_weights(local_qk_norm_weights(self, weights))
