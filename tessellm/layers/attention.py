"""The attention layer: holds its slice of the paged KV cache and calls the backend's kernel."""

from __future__ import annotations

import torch
import torch.nn as nn


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float, kernel):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.kernel = kernel
        self.k_cache = torch.empty(0)  # bound by the model runner once the cache is allocated
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata) -> torch.Tensor:
        t = q.shape[0]
        out = self.kernel.forward(q.view(t, self.num_heads, self.head_size),
                                  k.view(t, self.num_kv_heads, self.head_size),
                                  v.view(t, self.num_kv_heads, self.head_size),
                                  self.k_cache, self.v_cache, metadata, self.scale)
        return out.reshape(t, self.num_heads * self.head_size)
