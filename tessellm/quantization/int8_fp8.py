"""int8 weight-only (W8A16) and fp8 (W8A8) linear methods: per-output-channel weight scales.

int8: weights are quantized on load from a float checkpoint (symmetric, round to nearest,
scale = amax / 127 per output row); activations stay in the model dtype.

fp8: weights are either quantized on load (scale = amax / 448 per output row) or come
pre-quantized from a checkpoint (compressed-tensors / fbgemm FP8: ``weight`` in float8_e4m3fn
with ``weight_scale`` per channel ``[N, 1]`` or per tensor ``[]``/``[1]``). Activations are
quantized per token at run time (dynamic); a checkpoint's static ``input_scale`` is ignored.

Per-channel scales make every output row independent, so a fused layer's shards are quantized
as they arrive and a per-tensor scale of one shard becomes that shard's rows of scales::

    qkv rows:  [ q | k | v ]     weight_scale per tensor: sq, sk, sv
    scales:    [ sq .. sq | sk .. sk | sv .. sv ]
"""

from __future__ import annotations

import torch

from tessellm.quantization import sharding
from tessellm.quantization.base import QuantLinearMethod
from tessellm.quantization.packed import Fp8Weight, quantize_fp8, quantize_int8

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e4m3fnuz)


class Int8Method(QuantLinearMethod):
    name = "int8"
    accepts = ("weight",)

    def _load(self, layer, name, tensor, shard, pieces):
        if not tensor.is_floating_point() or tensor.dtype in FP8_DTYPES:
            raise ValueError(f"int8 quantizes float weights on load, but {layer.quant_name}."
                             f"{name} is stored as {tensor.dtype}; load this checkpoint with "
                             "its own quantization scheme.")
        pieces["weight"] = quantize_int8(tensor.to(layer.quant_device))

    def _finish(self, layer, pieces, rows):
        return pieces["weight"]


class Fp8Method(QuantLinearMethod):
    name = "fp8"
    accepts = ("weight", "weight_scale")
    ignores = ("input_scale", "input_scale_ub")  # static activation scales: we go per token

    def __init__(self, ops, config=None, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        super().__init__(ops, config)
        self.fp8_dtype = fp8_dtype

    def shard_tensor(self, layer, name, tensor, split):
        return sharding.fp8(layer, name, tensor, split)

    def load_weight(self, layer, name, tensor, shard):
        if name == "input_scale":  # unused (per token), but a static checkpoint must have it
            layer.quant_staged.setdefault(shard, {})["input_scale"] = True
            return
        super().load_weight(layer, name, tensor, shard)

    def _load(self, layer, name, tensor, shard, pieces):
        tensor = tensor.to(layer.quant_device)
        if name == "weight_scale":
            pieces["weight_scale"] = tensor.float().reshape(-1)
        elif tensor.dtype in FP8_DTYPES:
            if tensor.dtype != self.fp8_dtype:
                raise ValueError(f"{layer.quant_name}.weight is {tensor.dtype}, but this backend "
                                 f"runs fp8 as {self.fp8_dtype}; convert the checkpoint.")
            pieces["weight"] = tensor
        elif tensor.is_floating_point():  # a float checkpoint, or a layer it left unquantized
            pieces["weight"] = quantize_fp8(tensor, self.fp8_dtype)
        else:
            raise ValueError(f"fp8 cannot use {layer.quant_name}.weight stored as {tensor.dtype}.")

    def _missing(self, pieces):
        weight = pieces.get("weight")
        if weight is None:
            return ["weight"]
        if isinstance(weight, torch.Tensor) and "weight_scale" not in pieces:
            return ["weight_scale"]
        return []

    def _finish(self, layer, pieces, rows):
        weight = pieces["weight"]
        if isinstance(weight, Fp8Weight):
            if "weight_scale" in pieces:
                raise ValueError(f"{layer.quant_name} has a weight_scale but an unquantized weight.")
            return weight
        if self.config.get("activation_scheme") == "static" and "input_scale" not in pieces:
            raise ValueError(f"The checkpoint's quantization_config says activation_scheme "
                             f"'static', but {layer.quant_name} has no input_scale; set "
                             "\"activation_scheme\": \"dynamic\" in config.json (tessellm "
                             "quantizes activations per token at run time either way).")
        n = weight.shape[0]
        scale = pieces["weight_scale"]
        if scale.numel() == 1:
            scale = scale.expand(n).contiguous()
        elif scale.numel() != n:
            raise ValueError(f"{layer.quant_name}.weight_scale has {scale.numel()} values for "
                             f"{n} rows: only per-channel or per-tensor fp8 scales are supported "
                             "(block-wise fp8 checkpoints are not).")
        return Fp8Weight(weight.contiguous(), scale)
