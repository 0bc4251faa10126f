"""MXFP4 (OCP microscaling, FP4 E2M1 values with one E8M0 scale per 32): dequantized at load.

gpt-oss's released checkpoints store the MoE experts this way (``quant_method: mxfp4``; every
other weight is dense). tessellm has no MXFP4 kernels: the experts are widened to the model's
dtype as they are read (``models/gpt_oss.py``), so serving costs the dense experts' memory.

Layout, per expert projection (HF names ``<proj>_blocks`` / ``<proj>_scales``)::

    blocks  uint8 [E, out, in / 32, 16]   two E2M1 codes a byte: element 2j in the low
                                          nibble, 2j + 1 in the high one
    scales  uint8 [E, out, in / 32]       E8M0: the block's factor is 2^(scale - 127)

    value[e, o, 32 g + 2j]     = e2m1(blocks[e, o, g, j] & 0xF) * 2^(scales[e, o, g] - 127)
    value[e, o, 32 g + 2j + 1] = e2m1(blocks[e, o, g, j] >> 4)  * 2^(scales[e, o, g] - 127)

E2M1 (sign, 2 exponent bits, 1 mantissa bit, bias 1): 0, 0.5, 1, 1.5, 2, 3, 4, 6 and their
negatives. The result is ``[E, out, in]`` (HF transposes it to its ``[E, in, out]`` parameter).
"""

from __future__ import annotations

import torch

# E2M1 codes 0..15 -> value (code 8 is -0).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
               -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
BLOCK = 32  # values per scale


def dequantize_mxfp4(blocks: torch.Tensor, scales: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """``blocks`` uint8 ``[..., G, 16]`` and ``scales`` uint8 ``[..., G]`` -> ``[..., G * 32]``
    in ``dtype`` (exact: every E2M1 value times a power of two, within the dtype's range)."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and "
                         f"{scales.dtype}.")
    if blocks.shape[-1] != BLOCK // 2 or blocks.shape[:-1] != scales.shape:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} "
                         f"do not match: blocks are [..., G, {BLOCK // 2}], scales [..., G].")
    lut = torch.tensor(E2M1_VALUES, dtype=torch.float32, device=blocks.device)
    codes = torch.stack([blocks & 0x0F, blocks >> 4], dim=-1).long()  # [..., G, 16, 2]
    values = lut[codes].flatten(-2)  # [..., G, 32]: low nibble first
    values = torch.ldexp(values, scales.to(torch.int32)[..., None] - 127)
    return values.flatten(-2).to(dtype)
