"""The attention layer: holds its slice of the paged KV cache and calls the backend's kernel."""

from __future__ import annotations

from typing import Optional

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
        # Declared by the kernel (``AttentionKernel.fuses_rotary``): its forward can apply NeoX
        # rotary itself, so ``forward`` may be given unrotated q, k with their positions.
        self.fuses_rotary = bool(getattr(kernel, "fuses_rotary", False))
        self.k_cache = torch.empty(0)  # bound by the model runner once the cache is allocated
        self.v_cache = torch.empty(0)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, metadata,
                positions: Optional[torch.Tensor] = None,
                cos_sin_cache: Optional[torch.Tensor] = None,
                sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
        """q ``[T, H*D]``, k and v ``[T, KVH*D]``: rotated already, or, when ``positions`` and
        ``cos_sin_cache`` (``[max_position, D]``, cos then sin) are given, unrotated for the
        kernel to rotate (NeoX over the whole head; only if ``fuses_rotary``). Either way q and
        k are not to be read afterwards (the kernel may rotate them in place). ``sinks``: this
        layer's attention sinks, float32 ``[H]`` (a kernel built for ``attention_sinks``)."""
        t = q.shape[0]
        if isinstance(metadata, PerKernelMetadata):
            metadata = metadata[id(self.kernel)]
        rotary = {}
        if positions is not None:
            if not self.fuses_rotary:
                raise ValueError(f"Attention kernel {getattr(self.kernel, 'name', self.kernel)!r} "
                                 f"does not declare fuses_rotary; apply the rotary before "
                                 f"calling attention.")
            rotary = dict(positions=positions, cos_sin_cache=cos_sin_cache)
        if sinks is not None:
            rotary["sinks"] = sinks
        out = self.kernel.forward(q.view(t, self.num_heads, self.head_size),
                                  k.view(t, self.num_kv_heads, self.head_size),
                                  v.view(t, self.num_kv_heads, self.head_size),
                                  self.k_cache, self.v_cache, metadata, self.scale, **rotary)
        return out.reshape(t, self.num_heads * self.head_size)


class PerKernelMetadata(dict):
    """Step metadata of a model with several attention kernels: ``id(kernel)`` -> metadata."""


class PerWindowKernels:
    """The attention kernels of a model whose layers differ in sliding window (Gemma 3: local
    and global layers), behind the one ``build_metadata`` the model runner calls: it builds each
    kernel's metadata, and every ``Attention`` picks its own kernel's (``forward`` above)."""

    supports_sliding_window = True
    fuses_rotary = False

    def __init__(self, kernels):
        self.kernels = list(kernels)
        self.name = "+".join(getattr(k, "name", type(k).__name__) for k in self.kernels)
        self.supports_graph_capture = all(getattr(k, "supports_graph_capture", False)
                                          for k in self.kernels)

    def build_metadata(self, batch) -> PerKernelMetadata:
        # From a list, not a generator: a dict subclass built in a traced step is rebuilt from
        # its constructor's arguments at a graph break (a plugin kernel's data-dependent
        # index, e.g. the toy's ``slot_mapping[keep]``), and dynamo in torch 2.11 cannot
        # rebuild a generator there (InternalTorchDynamoError: 'LocalGeneratorObjectVariable'
        # object has no attribute 'remaining_items'); 2.13 can.
        return PerKernelMetadata([(id(k), k.build_metadata(batch)) for k in self.kernels])
