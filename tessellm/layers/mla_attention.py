"""The attention layer of multi-head latent attention (MLA): one latent row per token cached,
no value cache (``AttentionSpec.mla_value_size``; the model side is ``models/deepseek_mla.py``)."""

from __future__ import annotations

import torch

from tessellm.layers.attention import Attention, PerKernelMetadata


class LatentAttention(Attention):
    """``num_heads`` absorbed query heads over one cached row of ``head_size`` a token, whose
    first ``value_size`` dims are the values. The model runner allocates ``k_cache`` only
    (``caches_values``); ``v_cache`` stays None."""

    caches_values = False

    def __init__(self, num_heads: int, head_size: int, value_size: int, scale: float, kernel):
        super().__init__(num_heads, 1, head_size, scale, kernel)
        self.value_size = value_size
        self.v_cache = None

    def forward(self, q: torch.Tensor, latent: torch.Tensor, metadata) -> torch.Tensor:
        """q ``[T, H, head_size]`` (absorbed: ``[q_nope W_UK | q_pe]``), latent ``[T,
        head_size]`` (``[c_kv | k_pe]``, rotated) -> ``[T, H, value_size]``."""
        if isinstance(metadata, PerKernelMetadata):
            metadata = metadata[id(self.kernel)]
        t = q.shape[0]
        return self.kernel.forward(q, latent.view(t, 1, self.head_size), None, self.k_cache,
                                   None, metadata, self.scale)
