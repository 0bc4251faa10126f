"""IBM Granite (``GraniteForCausalLM``: Granite 3.x dense): the llama decoder with four scalars
from the config, each where HF's modeling_granite applies it::

    embeddings * embedding_multiplier
    softmax(q.k * attention_multiplier)          (in place of head_dim ** -0.5)
    residual + sublayer(x) * residual_multiplier (attention and MLP alike)
    logits / logits_scaling
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from tessellm.layers.context import ModelContext
from tessellm.models.llama import LlamaForCausalLM

_SCALARS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier",
            "logits_scaling")


class GraniteForCausalLM(LlamaForCausalLM):
    """Llama's switches (``attention_bias`` on q/k/v/o, ``mlp_bias``, no window)."""

    def __init__(self, config, ctx: ModelContext):
        self.check_scalars(config)  # before the layers read them
        super().__init__(config, ctx)
        self.embedding_multiplier = float(config.embedding_multiplier)
        self.logits_scaling = float(config.logits_scaling)

    def attention_scale(self, config) -> Optional[float]:
        return float(config.attention_multiplier)

    def residual_multiplier(self, config) -> float:
        return float(config.residual_multiplier)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling

    @staticmethod
    def check_scalars(config) -> None:
        for name in _SCALARS:
            value = getattr(config, name, None)
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if not number or not math.isfinite(value) or (name == "logits_scaling" and value == 0):
                raise ValueError(f"Granite config {name}={value!r} is not supported: it must be "
                                 "a finite number (logits_scaling non-zero); GraniteConfig's "
                                 "default is 1.0.")
