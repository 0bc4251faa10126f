"""int8 weight-only quantization: per-output-channel symmetric scales, dequantized per call."""

from __future__ import annotations

import torch


class ToyInt8LinearMethod:
    name = "int8-weight-only"

    def create_weights(self, layer, input_size: int, output_size: int, dtype) -> None:
        layer.weight = torch.nn.Parameter(torch.zeros(output_size, input_size, dtype=torch.int8),
                                          requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(torch.ones(output_size), requires_grad=False)

    def quantize_dense(self, layer, weight: torch.Tensor) -> None:
        scale = (weight.float().abs().amax(dim=1) / 127.0).clamp(min=1e-12)
        layer.weight.data = torch.round(weight.float() / scale[:, None]).clamp(-127, 127).to(torch.int8)
        layer.weight_scale.data = scale

    def process_weights_after_loading(self, layer) -> None:
        return None

    def apply(self, layer, x: torch.Tensor, bias=None) -> torch.Tensor:
        w = layer.weight.float() * layer.weight_scale[:, None]
        out = x.float() @ w.t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
