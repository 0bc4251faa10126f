"""FP8 weight quantization for AMD GPUs.

MI300-class parts (gfx94x) do fp8 arithmetic in the ``float8_e4m3fnuz`` format (no negative
zero, NaN = 0x80, max 240, exponent bias 8); MI350 (gfx950) and NVIDIA use OCP ``e4m3fn``
(max 448). Weights are stored per output channel: ``W ~= w_fp8 * scale[:, None]``.

``apply``: on a ROCm device, up to ``weight_only_max_m`` rows (decode) run weight-only through
the portable Triton W8A16 kernel (``tessellm.kernels.gemm.weight_only.fp8_w8a16``, which widens either fp8
format in the GEMM); more rows quantize the activations per token to the same format and
multiply with ``torch._scaled_mm`` (hipBLASLt). M is fixed per captured graph, so a graph always
takes one side. Anywhere else the weight is dequantized to x's dtype and multiplied (correct,
not fast: used on CPU for tests). The threshold is the H200's (32); not measured on AMD.
"""

from __future__ import annotations

import torch


def fp8_dtype_for(device: torch.device):
    """e4m3fnuz on gfx94x (MI300), e4m3fn elsewhere (gfx950, CPU tests)."""
    if device.type == "cuda" and getattr(torch.version, "hip", None):
        arch = getattr(torch.cuda.get_device_properties(device), "gcnArchName", "")
        if arch.startswith("gfx94"):
            return torch.float8_e4m3fnuz
    return torch.float8_e4m3fn


class RocmFp8LinearMethod:
    """``QuantMethod`` "fp8": per-channel fp8 weights, per-token dynamic fp8 activations."""

    name = "fp8"

    def __init__(self, fp8_dtype=None, weight_only_max_m: int = 32):
        self.fp8_dtype = fp8_dtype  # None: chosen from the device in create_weights
        self.weight_only_max_m = weight_only_max_m  # W8A16 up to this many rows; 0: never

    def create_weights(self, layer, input_size: int, output_size: int, dtype) -> None:
        fp8 = self.fp8_dtype or fp8_dtype_for(torch.get_default_device())
        layer.weight = torch.nn.Parameter(torch.empty(output_size, input_size, dtype=fp8),
                                          requires_grad=False)
        layer.weight_scale = torch.nn.Parameter(torch.ones(output_size, dtype=torch.float32),
                                                requires_grad=False)

    def quantize_dense(self, layer, weight: torch.Tensor) -> None:
        fp8 = layer.weight.dtype
        fmax = torch.finfo(fp8).max
        w = weight.float()
        scale = (w.abs().amax(dim=1) / fmax).clamp(min=1e-12)
        layer.weight.data = (w / scale[:, None]).clamp(-fmax, fmax).to(fp8).to(layer.weight.device)
        layer.weight_scale.data = scale.to(layer.weight_scale.device)

    def process_weights_after_loading(self, layer) -> None:
        return None

    def apply(self, layer, x: torch.Tensor, bias=None) -> torch.Tensor:
        if x.device.type == "cuda" and getattr(torch.version, "hip", None):
            x2 = x.reshape(-1, x.shape[-1])
            if x2.shape[0] <= self.weight_only_max_m:
                from tessellm.kernels.gemm.weight_only import fp8_w8a16

                out = fp8_w8a16(x2, layer.weight, layer.weight_scale, bias)
                return out.reshape(*x.shape[:-1], -1)
            return self._apply_scaled_mm(layer, x, bias)
        w = layer.weight.to(torch.float32) * layer.weight_scale[:, None]
        out = x.float() @ w.t()
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)

    def _apply_scaled_mm(self, layer, x, bias):
        fp8 = layer.weight.dtype
        fmax = torch.finfo(fp8).max
        x2 = x.reshape(-1, x.shape[-1])
        x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / fmax).clamp(min=1e-12)
        xq = (x2 / x_scale).clamp(-fmax, fmax).to(fp8)
        out = torch._scaled_mm(xq, layer.weight.t(), scale_a=x_scale,
                               scale_b=layer.weight_scale[None, :], bias=bias, out_dtype=x.dtype)
        return out.reshape(*x.shape[:-1], -1)
