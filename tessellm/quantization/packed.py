"""Quantized weight formats as they sit in memory, and their reference dequantization.

Every quantized linear layer ends up holding one or more *segments*, each one of four kinds.
A segment covers some output rows ``N`` of the layer; input size is ``K``. ``g = k // group``:

    kind   storage                                   w[n, k] =
    int8   qweight int8  [N, K], scales [G, N]       qweight[n, k] * scales[g, n]
    int4   qweight int32 [K/8, N], scales [G, N],    (q[k, n] - zero_point) * scales[g, n]
           offsets [G, N] or None                        + offsets[g, n]
    fp8    qweight e4m3  [N, K], scales fp32 [N]     qweight[n, k] * scales[n]
    dense  weight        [N, K]                      weight[n, k]

int4 packing (GPTQ's layout; AWQ and GGUF are converted to it at load)::

    qweight[r, n] (int32) = q[8r, n] | q[8r+1, n] << 4 | ... | q[8r+7, n] << 28

``perm`` (int4, GPTQ act-order): the rows of q were sorted so that groups are contiguous; the
layer gathers ``x[..., perm]`` before the GEMM.

These modules hold buffers only (never Parameters), so ``model.named_parameters()`` still lists
exactly the dense tensors a checkpoint must provide.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn as nn

FP8_E4M3_MAX = 448.0  # largest finite float8_e4m3fn
INT8_MAX = 127.0


class PackedWeight(nn.Module):
    kind = ""

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``[N, K]`` weight this segment stands for, in ``dtype`` (a reference, not fast)."""
        raise NotImplementedError

    def extra_repr(self) -> str:
        return ", ".join(f"{n}={tuple(b.shape)}:{str(b.dtype).replace('torch.', '')}"
                         for n, b in self.named_buffers(recurse=False) if b is not None)


class Int8Weight(PackedWeight):
    kind = "int8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, group_size: int):
        super().__init__()
        assert qweight.dtype == torch.int8 and qweight.dim() == 2 and scales.dim() == 2
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.group_size = group_size  # == K for per-channel scales (G = 1)

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self, dtype=torch.float32):
        s = self.scales.float().repeat_interleave(self.group_size, dim=0)[: self.qweight.shape[1]]
        return (self.qweight.float() * s.t()).to(dtype)


class Int4Weight(PackedWeight):
    kind = "int4"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, offsets: Optional[torch.Tensor],
                 zero_point: int, group_size: int, perm: Optional[torch.Tensor] = None):
        super().__init__()
        assert qweight.dtype == torch.int32 and qweight.shape[1] == scales.shape[1]
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("offsets", offsets)
        self.register_buffer("perm", perm)
        # the codes re-laid for a backend's kernel at load (the cuda backend's tensor-core
        # GEMM: ``kernels/gemm/int4_tc.py``); None in the checkpoint layout only
        self.register_buffer("tc_qweight", None)
        self.zero_point = zero_point  # 0, or 8 for GGUF Q4_0 (signed codes stored with +8)
        self.group_size = group_size

    @property
    def out_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self, dtype=torch.float32):
        """``[N, K]`` in the layer's input order (``perm`` undone). A backend that kept only
        the tc layout (``qweight`` emptied to ``[0, N]``) is read from ``tc_qweight``."""
        if self.qweight.shape[0] == 0 and self.tc_qweight is not None:
            q = unpack_int4_tc(self.tc_qweight).float() - self.zero_point
        else:
            q = unpack_int4(self.qweight).float() - self.zero_point  # [K, N]
        w = q * self.scales.float().repeat_interleave(self.group_size, dim=0)[: q.shape[0]]
        if self.offsets is not None:
            w = w + self.offsets.float().repeat_interleave(self.group_size, dim=0)[: q.shape[0]]
        if self.perm is not None:
            w = torch.empty_like(w).index_copy_(0, self.perm.long(), w)
        return w.t().contiguous().to(dtype)


class Fp8Weight(PackedWeight):
    kind = "fp8"

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor):
        super().__init__()
        assert qweight.dim() == 2 and scales.shape == (qweight.shape[0],)
        self.register_buffer("qweight", qweight)
        self.register_buffer("scales", scales.float())

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    def dequantize(self, dtype=torch.float32):
        return (self.qweight.float() * self.scales[:, None]).to(dtype)


class DenseWeight(PackedWeight):
    kind = "dense"

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("weight", weight)

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def dequantize(self, dtype=torch.float32):
        return self.weight.to(dtype)


# ---------------------------------------------------------------------------------------------
# int4 packing
# ---------------------------------------------------------------------------------------------

_SHIFTS = torch.arange(0, 32, 4, dtype=torch.int32)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """``[K, N]`` integers in 0..15 -> int32 ``[K/8, N]`` (8 consecutive k per word, low first)."""
    k, n = q.shape
    assert k % 8 == 0, f"int4 packing needs K divisible by 8, got {k}"
    q = q.to(torch.int64).reshape(k // 8, 8, n) << _SHIFTS.to(q.device, torch.int64)[None, :, None]
    word = q.sum(dim=1)  # disjoint bits: the sum is the bitwise or, in 0 .. 2^32 - 1
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def unpack_int4_tc(qt: torch.Tensor) -> torch.Tensor:
    """The cuda backend's tc layout (``kernels/gemm/int4_tc.py``: int32 ``[N, K/8]``, nibble i
    of word j of 128-input block b = input ``128 b + 16 i + j``) -> uint8 ``[K, N]``."""
    n, kw = qt.shape
    shifts = _SHIFTS.to(qt.device)
    q = (qt.reshape(n, kw // 16, 1, 16) >> shifts[None, None, :, None]) & 0xF  # [n, b, i, j]
    return q.reshape(n, kw * 8).t().to(torch.uint8).contiguous()


def unpack_int4(qweight: torch.Tensor) -> torch.Tensor:
    """int32 ``[K/8, N]`` -> uint8 ``[K, N]`` in 0..15."""
    shifts = _SHIFTS.to(qweight.device)[None, :, None]
    # torch.bitwise_right_shift, not ``>>``: torch-xla 2.9 lowers ``>>`` of a negative int32 as a
    # division rounded toward zero, which corrupts the codes of every word with bit 31 set
    q = torch.bitwise_right_shift(qweight[:, None, :], shifts) & 0xF
    return q.reshape(-1, qweight.shape[1]).to(torch.uint8)


# ---------------------------------------------------------------------------------------------
# Quantizers (load-time, and the oracle side of tests)
# ---------------------------------------------------------------------------------------------


def quantize_int8(w: torch.Tensor, group_size: Optional[int] = None) -> Int8Weight:
    """Symmetric round-to-nearest int8 of ``w [N, K]``; per output channel by default."""
    n, k = w.shape
    group = group_size or k
    assert k % group == 0, f"K={k} is not a multiple of group size {group}"
    wg = w.float().reshape(n, k // group, group)
    scales = wg.abs().amax(dim=-1) / INT8_MAX  # [N, G]
    q = torch.round(wg / scales.clamp(min=1e-30)[..., None]).clamp(-INT8_MAX, INT8_MAX)
    return Int8Weight(q.reshape(n, k).to(torch.int8), scales.t().contiguous(), group)


def quantize_fp8(w: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> Fp8Weight:
    """Per-output-channel fp8 of ``w [N, K]``: scale = amax / fp8 max."""
    fmax = torch.finfo(fp8_dtype).max
    scales = w.float().abs().amax(dim=1) / fmax
    q = (w.float() / scales.clamp(min=1e-30)[:, None]).clamp(-fmax, fmax).to(fp8_dtype)
    return Fp8Weight(q, scales)


def quantize_fp8_per_token(x: torch.Tensor, fp8_dtype: torch.dtype = torch.float8_e4m3fn):
    """Dynamic per-row activation quantization: ``(x_q [M, K] fp8, scales [M] fp32)``."""
    fmax = torch.finfo(fp8_dtype).max
    scales = x.float().abs().amax(dim=-1).clamp(min=1e-12) / fmax
    q = (x.float() / scales[:, None]).clamp(-fmax, fmax).to(fp8_dtype)
    return q, scales


@dataclass
class Fp8Activation:
    """An activation already quantized to fp8 per token by the op that produced it (the fp8
    activation fold: a norm or SiLU-and-mul that quantizes its own output), handed to an fp8
    linear's W8A8 product instead of the model-dtype tensor::

        x[m, k] ~= qx[m, k] * scales[m]      scales[m] = max(max_k |x[m, k]|, 1e-12) / FP8_MAX

    where x is the producer's output rounded to ``dtype`` (what the unfused op would return).
    Rows are tokens: ``[M, K]``, 2-D like the model's flat hidden states."""

    qx: torch.Tensor  # [M, K] fp8 (the weight's fp8 dtype), contiguous
    scales: torch.Tensor  # [M, 1] float32 (the layout torch._scaled_mm takes)
    dtype: torch.dtype  # the model dtype x had: the product is returned in it

    @property
    def shape(self) -> torch.Size:
        return self.qx.shape

    @classmethod
    def quantize(cls, x: torch.Tensor, fp8_dtype: torch.dtype) -> "Fp8Activation":
        """The reference: ``quantize_fp8_per_token`` of a model-dtype ``x [M, K]``."""
        q, s = quantize_fp8_per_token(x, fp8_dtype)
        return cls(q, s[:, None], x.dtype)


def quantize_int4(w: torch.Tensor, group_size: int, symmetric: bool = False):
    """Round-to-nearest int4 of ``w [N, K]`` in groups along K, the way AWQ/GPTQ store it.

    Returns ``(q [K, N] in 0..15, scales [G, N] fp32, zeros [G, N] int in 0..15)`` with
    ``w ~= (q - zeros) * scales``. (GPTQ and AWQ choose q more cleverly; the format is the same.)
    """
    n, k = w.shape
    wg = w.float().t().reshape(k // group_size, group_size, n)
    if symmetric:
        scales = wg.abs().amax(dim=1) / 7.5
        zeros = torch.full_like(scales, 8)
    else:
        lo, hi = wg.amin(dim=1).clamp(max=0), wg.amax(dim=1).clamp(min=0)
        scales = (hi - lo) / 15
        zeros = torch.round(-lo / scales.clamp(min=1e-30)).clamp(0, 15)
    q = torch.round(wg / scales.clamp(min=1e-30)[:, None, :] + zeros[:, None, :]).clamp(0, 15)
    return q.reshape(k, n).to(torch.int32), scales, zeros.to(torch.int32)


def cat_rows(tensors: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors)`` along dim 0, fp8 codes through their bytes: older torch builds
    (2.8, the xpu lane's) have no CPU copy kernel for float8 dtypes."""
    if tensors[0].dtype.itemsize == 1 and tensors[0].is_floating_point():
        return torch.cat([t.view(torch.uint8) for t in tensors]).view(tensors[0].dtype)
    return torch.cat(tensors)


def cat_segments(segments: list[PackedWeight]) -> list[PackedWeight]:
    """Merge adjacent segments of the same kind and layout into one along the output dim."""
    out: list[PackedWeight] = []
    for seg in segments:
        prev = out[-1] if out else None
        if prev is not None and _same_layout(prev, seg):
            out[-1] = _cat2(prev, seg)
        else:
            out.append(seg)
    return out


def _same_layout(a: PackedWeight, b: PackedWeight) -> bool:
    if hasattr(a, "can_cat"):  # a format that says itself when it stacks (fp8_block.py)
        return a.can_cat(b)
    if a.kind != b.kind:
        return False
    bufs_a, bufs_b = dict(a.named_buffers()), dict(b.named_buffers())
    if bufs_a.keys() != bufs_b.keys() or any(bufs_a[n].dtype != bufs_b[n].dtype for n in bufs_a):
        return False
    return (getattr(a, "group_size", 0) == getattr(b, "group_size", 0)
            and getattr(a, "zero_point", 0) == getattr(b, "zero_point", 0)
            and getattr(a, "perm", None) is None and getattr(b, "perm", None) is None)


def _cat2(a: PackedWeight, b: PackedWeight) -> PackedWeight:
    if hasattr(a, "cat_with"):
        return a.cat_with(b)
    if a.kind == "int8":
        return Int8Weight(torch.cat([a.qweight, b.qweight]), torch.cat([a.scales, b.scales], 1),
                          a.group_size)
    if a.kind == "int4":
        offsets = None if a.offsets is None else torch.cat([a.offsets, b.offsets], 1)
        return Int4Weight(torch.cat([a.qweight, b.qweight], 1), torch.cat([a.scales, b.scales], 1),
                          offsets, a.zero_point, a.group_size)
    if a.kind == "fp8":
        return Fp8Weight(cat_rows([a.qweight, b.qweight]), torch.cat([a.scales, b.scales]))
    return DenseWeight(torch.cat([a.weight, b.weight]))
