"""The attention layer of multi-head latent attention (MLA): one latent row per token cached,
no value cache (``AttentionSpec.mla_value_size``; the model side is ``models/deepseek_mla.py``).

A kernel may also offer the expanded form for long prefill chunks (the Triton kernel,
``kernels/attention/mla_prefill.py``): its metadata's ``expanded`` is set for such a step, and
the model then hands ``forward`` only the decodes' absorbed queries, decompresses
``context_rows`` itself (``kv_b_proj``) and calls ``forward_expanded`` for the rest. A kernel
without it (the contract's ``supports_mla`` alone) gets every query absorbed."""

from __future__ import annotations

from typing import Optional

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

    def _metadata(self, metadata):
        if isinstance(metadata, PerKernelMetadata):
            return metadata[id(self.kernel)]
        return metadata

    def forward(self, q: torch.Tensor, latent: torch.Tensor, metadata) -> torch.Tensor:
        """q ``[Tq, H, head_size]`` (absorbed: ``[q_nope W_UK | q_pe]``), latent ``[T,
        head_size]`` (``[c_kv | k_pe]``, rotated; every row is cached) -> ``[Tq, H,
        value_size]``. Tq is T, or the decodes' rows of an expanded step."""
        t = latent.shape[0]
        return self.kernel.forward(q, latent.view(t, 1, self.head_size), None, self.k_cache,
                                   None, self._metadata(metadata), self.scale)

    def expanded_rows(self, metadata) -> Optional[int]:
        """Where this step's expanded queries start (they run to the end), or None: the whole
        step is absorbed."""
        expanded = getattr(self._metadata(metadata), "expanded", None)
        return None if expanded is None else expanded.num_decode_tokens

    def context_rows(self, metadata, dtype: torch.dtype) -> torch.Tensor:
        """The expanded sequences' cached latent rows ``[K, head_size]`` (after ``forward``
        wrote this step's)."""
        return self.kernel.context_rows(self.k_cache, self._metadata(metadata), dtype)

    def forward_expanded(self, q, k_nope, k_pe, v, metadata) -> torch.Tensor:
        """Multi-head attention of the expanded queries ``q`` ``[T_p, H, n + r]`` over the
        decompressed context (``k_nope`` ``[K, H, n]``, ``k_pe`` ``[K, r]``, ``v`` ``[K, H,
        v]``): ``[T_p, H, v]``."""
        return self.kernel.forward_expanded(q, k_nope, k_pe, v, self._metadata(metadata),
                                            self.scale)
