"""The block-wise fp8 linear method (scheme ``fp8_block``): Qwen3-*-FP8 and DeepSeek-V3/R1
checkpoints kept in fp8 with their block scales (``fp8_block.py`` draws the format).

Checkpoint tensors of one layer: ``weight`` e4m3 ``[N, K]`` and ``weight_scale_inv`` float32
``[ceil(N/bn), ceil(K/bk)]``. A fused layer's shards (q/k/v, gate/up) become one segment each,
merged along N where every shard but the last ends on a row-block boundary
(``Fp8BlockWeight.can_cat``). A layer the checkpoint left in bf16 (no scale) stays dense.
``quantization="fp8_block"`` on a dense checkpoint quantizes each block on load (scale =
amax / 448), so ``load_format="dummy"`` and benchmarks need no fp8 checkpoint.

The product is the backend's ``QuantOps.fp8_block_mm(x, w, bias)``: the reference and cpu
dequantize a slab of blocks and multiply (W8A16), the Triton kernels quantize x per token and
group of ``bk`` and multiply fp8 by fp8 (W8A8, ``kernels/gemm/fp8_block.py``).

Tensor parallelism cuts weight and scales together (``sharding.fp8_block``): a rank's rows
(column-parallel) or inputs (row-parallel) must start and end on block boundaries.
"""

from __future__ import annotations

import torch

from tessellm.quantization import sharding
from tessellm.quantization.base import QuantLinearMethod, dense_segment
from tessellm.quantization.fp8_block import (Fp8BlockWeight, block_config, quantize_fp8_block,
                                             scale_shape)
from tessellm.quantization.int8_fp8 import FP8_DTYPES


class Fp8BlockMethod(QuantLinearMethod):
    name = "fp8_block"
    accepts = ("weight", "weight_scale_inv")

    def __init__(self, ops, config=None, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
        super().__init__(ops, config)
        self.block = block_config(self.config)
        self.fp8_dtype = fp8_dtype
        self.prequantized = bool(self.config.get("prequantized", False))

    def shard_tensor(self, layer, name, tensor, split):
        return sharding.fp8_block(layer, name, tensor, split, self.block)

    def _load(self, layer, name, tensor, shard, pieces):
        tensor = tensor.to(layer.quant_device)
        if name == "weight_scale_inv":
            pieces[name] = tensor.float()
        elif tensor.dtype in FP8_DTYPES:
            if tensor.dtype != self.fp8_dtype:
                raise ValueError(f"{layer.quant_name}.weight is {tensor.dtype}, but this backend "
                                 f"runs fp8 as {self.fp8_dtype}; convert the checkpoint.")
            pieces["weight"] = tensor
        elif tensor.is_floating_point():
            # quantize on load; or, in an fp8 checkpoint, a layer it left unquantized
            pieces["weight"] = (dense_segment(tensor, layer) if self.prequantized
                                else quantize_fp8_block(tensor, self.block, self.fp8_dtype))
        else:
            raise ValueError(f"fp8_block cannot use {layer.quant_name}.weight stored as "
                             f"{tensor.dtype}: a block-wise fp8 checkpoint holds e4m3 codes (or "
                             "float weights for layers it left unquantized); load the dense "
                             "checkpoint with quantization='fp8_block', or pass the scheme its "
                             "quantization_config names.")

    def _missing(self, pieces):
        weight = pieces.get("weight")
        if weight is None:
            return ["weight"]
        if isinstance(weight, torch.Tensor) and "weight_scale_inv" not in pieces:
            return ["weight_scale_inv"]
        return []

    def _finish(self, layer, pieces, rows):
        weight = pieces["weight"]
        if not isinstance(weight, torch.Tensor):
            return weight  # quantized on load, or dense
        scales = pieces["weight_scale_inv"]
        want = scale_shape(*weight.shape, self.block)
        if tuple(scales.shape) != want:
            raise ValueError(f"{layer.quant_name}.weight_scale_inv has shape "
                             f"{tuple(scales.shape)}, but a {tuple(weight.shape)} weight in "
                             f"blocks of {list(self.block)} needs {want}; does "
                             "weight_block_size in config.json match the checkpoint?")
        return Fp8BlockWeight(weight.contiguous(), scales, self.block)
