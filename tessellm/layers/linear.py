"""Linear layers, including the fused QKV and gate-up projections and their weight loading."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Module):
    """``y = x W^T + b``. A fused layer stacks several logical weights along the output dim.

    ``shard_sizes`` names the output rows of each logical weight, so a checkpoint's separate
    ``q_proj``/``k_proj``/``v_proj`` load into one ``qkv_proj``::

        weight rows: [ q (shard 0) | k (shard 1) | v (shard 2) ]
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool = False,
                 quant_method=None):
        super().__init__()
        self.input_size = input_size
        self.output_sizes = list(output_sizes)
        self.output_size = sum(self.output_sizes)
        self.quant_method = quant_method
        if quant_method is not None:
            quant_method.create_weights(self, input_size, self.output_size, None)
        else:
            self.weight = nn.Parameter(torch.empty(self.output_size, input_size), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(self.output_size), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant_method is not None:
            return self.quant_method.apply(self, x, self.bias)
        return F.linear(x, self.weight, self.bias)

    def load_shard(self, name: str, tensor: torch.Tensor, shard: Optional[int]) -> None:
        """Copy a checkpoint tensor (``name`` is "weight" or "bias") into its rows. A quant
        method with ``load_weight`` (tessellm.quantization's) takes the tensor instead: it knows
        where quantized pieces (``qweight``, ``weight_scale``, ...) of a shard go."""
        load_weight = getattr(self.quant_method, "load_weight", None)
        if load_weight is not None:
            load_weight(self, name, tensor, shard)
            return
        param = getattr(self, name)
        if shard is None:
            _copy_checked(param.data, tensor, name)
            return
        start = sum(self.output_sizes[:shard])
        _copy_checked(param.data[start:start + self.output_sizes[shard]], tensor, name)


def _copy_checked(dst: torch.Tensor, src: torch.Tensor, name: str) -> None:
    if dst.shape != src.shape:
        raise ValueError(f"Checkpoint tensor for {name} has shape {tuple(src.shape)}, "
                         f"expected {tuple(dst.shape)}; the config does not match the weights.")
    dst.copy_(src)
