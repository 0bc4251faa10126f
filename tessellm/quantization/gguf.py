"""GGUF weights kept quantized in memory: llama.cpp blocks -> packed segments, and the method.

Each GGUF row is a run of blocks along the input dim (K). A block's codes and scales map onto
the generic segments of ``packed.py`` without changing a single value::

    Q8_0  [d f16 | 32 x int8]                 -> int8, group 32, scale d           (8.5 bit)
    Q4_0  [d f16 | 16 bytes: lo=k 0..15,        -> int4, group 32, scale d, zp 8     (4.5 bit)
                   hi=k 16..31]
    Q4_1  [d f16 | m f16 | 16 bytes]          -> int4, group 32, scale d, offset m  (5 bit)
    Q4_K  256-superblock: d, dmin f16, 8 x     -> int4, group 32, scale d*sc,        (6 bit here;
          6-bit (sc, m), 128 bytes of nibbles          offset -dmin*m in float32      4.5 in file)
    Q6_K  256-superblock: 6-bit codes, 16 x     -> int8 (code - 32), group 16,        (10 bit here;
          int8 scales, d f16                           scale d*sc in float32          6.6 in file)

Dequantizing a segment (``PackedWeight.dequantize``) performs the same float32 operations as
``gguf.quants.dequantize``, so the two agree bit for bit (tests check this). Other GGUF types
(Q5_x, Q2_K/Q3_K/Q5_K, IQ*) are dequantized to dense rows, with a warning.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import torch

from tessellm.quantization import sharding
from tessellm.quantization.base import QuantLinearMethod, dense_segment
from tessellm.quantization.packed import Int4Weight, Int8Weight, PackedWeight, pack_int4

logger = logging.getLogger(__name__)

Q = gguf.GGMLQuantizationType
KEPT_QUANTIZED = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K)
_DENSE = (Q.F32, Q.F16, Q.BF16)


def _nibbles(qs: np.ndarray, run: int) -> np.ndarray:
    """``[..., run]`` bytes -> ``[..., 2 * run]`` codes: low nibbles first, then high nibbles."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _f16(raw: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(raw).view(np.float16)[..., 0]


def _int4_segment(codes: np.ndarray, scales, offsets, zero_point: int, group: int) -> Int4Weight:
    """codes ``[rows, K]`` (0..15), scales/offsets ``[rows, G]``."""
    q = torch.from_numpy(np.ascontiguousarray(codes.T)).to(torch.int32)
    t = lambda a: None if a is None else torch.from_numpy(np.ascontiguousarray(a.T))  # noqa: E731
    return Int4Weight(pack_int4(q), t(scales), t(offsets), zero_point, group)


def segment_from_blocks(qtype: Q, raw: np.ndarray, shape: tuple[int, int]) -> PackedWeight | None:
    """``raw``: uint8 ``[rows, row_bytes]`` of one GGUF tensor (torch order ``shape``).
    Returns a packed segment, or None when ``qtype`` is not kept quantized."""
    rows, k = shape
    if qtype == Q.Q8_0:
        b = raw.reshape(rows, k // 32, 34)
        codes = np.ascontiguousarray(b[..., 2:]).view(np.int8).reshape(rows, k)
        return Int8Weight(torch.from_numpy(codes.copy()),
                          torch.from_numpy(np.ascontiguousarray(_f16(b[..., :2]).T)), 32)
    if qtype == Q.Q4_0:
        b = raw.reshape(rows, k // 32, 18)
        codes = _nibbles(b[..., 2:], 16).reshape(rows, k)
        return _int4_segment(codes, _f16(b[..., :2]), None, 8, 32)
    if qtype == Q.Q4_1:
        b = raw.reshape(rows, k // 32, 20)
        codes = _nibbles(b[..., 4:], 16).reshape(rows, k)
        return _int4_segment(codes, _f16(b[..., :2]), _f16(b[..., 2:4]), 0, 32)
    if qtype == Q.Q4_K:
        return _q4_k(raw.reshape(rows * (k // 256), 144), rows, k)
    if qtype == Q.Q6_K:
        return _q6_k(raw.reshape(rows * (k // 256), 210), rows, k)
    return None


def _q4_k(b: np.ndarray, rows: int, k: int) -> Int4Weight:
    d = _f16(b[:, 0:2]).astype(np.float32)[:, None]
    dmin = _f16(b[:, 2:4]).astype(np.float32)[:, None]
    sc, m = gguf.quants.Q4_K.get_scale_min(np.ascontiguousarray(b[:, 4:16]))
    scales = d * sc.astype(np.float32)  # [nb, 8]: one per 32 weights
    offsets = -(dmin * m.astype(np.float32))
    qs = b[:, 16:].reshape(-1, 4, 32)  # 4 runs of 32 bytes -> 8 sub-blocks (lo, hi nibbles)
    codes = np.stack([qs & 0x0F, qs >> 4], axis=2).reshape(rows, k)
    return _int4_segment(codes, scales.reshape(rows, -1), offsets.reshape(rows, -1), 0, 32)


def _q6_k(b: np.ndarray, rows: int, k: int) -> Int8Weight:
    ql, qh = b[:, :128], b[:, 128:192]
    sc = np.ascontiguousarray(b[:, 192:208]).view(np.int8).astype(np.float32)
    d = _f16(b[:, 208:210]).astype(np.float32)[:, None]
    lo = (ql.reshape(-1, 2, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    hi = (qh.reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    codes = (lo.reshape(-1, 8, 32) | (hi.reshape(-1, 8, 32) << 4)).astype(np.int8) - np.int8(32)
    scales = (d * sc).reshape(rows, -1)  # [rows, K/16]
    return Int8Weight(torch.from_numpy(codes.reshape(rows, k)),
                      torch.from_numpy(np.ascontiguousarray(scales.T)), 16)


class GgufMethod(QuantLinearMethod):
    """Takes ``gguf_loader.GGUFQuantized`` tensors (raw blocks) or dense ones per shard."""

    name = "gguf"
    accepts = ("weight",)

    def shard_tensor(self, layer, name, tensor, split):
        return sharding.gguf_blocks(layer, name, tensor, split)

    def _load(self, layer, name, tensor, shard, pieces):
        seg = None
        if hasattr(tensor, "qtype"):  # raw GGUF blocks
            seg = segment_from_blocks(tensor.qtype, tensor.data.numpy(), tensor.shape)
            if seg is None:
                logger.warning("GGUF type %s of %s is not kept quantized; it is dequantized.",
                               tensor.qtype.name, layer.quant_name)
                seg = dense_segment(tensor.dequantize(), layer)
        else:
            seg = dense_segment(tensor, layer)
        pieces["weight"] = seg.to(layer.quant_device)

    def _finish(self, layer, pieces, rows):
        return pieces["weight"]

    def _quantize_shard(self, layer, w, shard):
        """Dense rows -> Q8_0 blocks (with the ``gguf`` package, as llama.cpp would)."""
        from tessellm.loader.gguf_loader import GGUFQuantized

        blocks = gguf.quants.quantize(w.detach().float().cpu().numpy(), Q.Q8_0)
        self.load_weight(layer, "weight", GGUFQuantized(Q.Q8_0, tuple(w.shape),
                                                        torch.from_numpy(blocks)), shard)

    def init_dummy(self, layer, generator, scale=0.02):
        raise ValueError("quantization='gguf' needs a .gguf checkpoint; it has no dummy weights "
                         "(use int8 or fp8 with load_format='dummy').")
