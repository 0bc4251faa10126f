"""The cpu backend's ``QuantOps``: torch's CPU int4 weight-only GEMM for int4 and grouped int8.

``torch.ops.aten._weight_int4pack_mm_for_cpu`` (AVX-512/AVX2, group 32-256) reads 4-bit codes
with one (scale, zero) pair per group, ``w = (code - 8) * scale + zero``, and is fast only with
bfloat16 activations (float32 or float16 take a scalar path ~40x slower; 2 cores, 2026-12).
Every segment is repacked once, on its first product, into the layout it wants:

    int4  (q - zp) * s + off   ->  scale s, zero off + (8 - zp) * s    (Q4_0, Q4_1, Q4_K, AWQ, GPTQ)
    int8  q * s, group g       ->  q = 16 h + l (h in -8..7, l in 0..15): two int4 halves along
                                   K, ``[x, x] @ [16 s (h+8 - 8) | s (l - 8) + 8 s]``   (Q8_0)

Both rewrites are exact in real arithmetic; what changes against the float32 reference
(``TorchQuantOps``, dequantize then matmul) is the rounding: x, the scales and zeros and the
result are bfloat16, the sums float32 in another order. Greedy tokens can therefore differ from
the float32 path after some steps (``tests/quantization/test_cpu_quant_ops.py`` bounds the error
against the dequantized weight). ``TESSELLM_CPU_INT4PACK=0`` keeps the float32 reference path.
GPTQ act-order segments (``perm``: rows stored sorted by group) gather ``x[:, perm]`` and then
take the kernel. Groups of 16 (Q6_K), per-channel int8, fp8 and int4 groups the kernel does not
take (per channel over an input size outside 32-256) go through the reference ops.

Block-wise fp8 (``fp8_block``: Qwen3-FP8, DeepSeek-V3) is dequantized once, on a segment's first
product, to float32 (this backend's compute dtype) and kept, its e4m3 codes released as above
(``dequantize`` returns the cached weight, bit for bit what it computed before): widening e4m3
on this CPU costs far more than the product it feeds (2 cores, 2026-12-05, loaded machine:
4096x4096, one row: 1,792 ms dequantizing a slab at a time against 8.9 ms for the float32
GEMV), so the layer costs what the dequantized checkpoint costs, in time and in memory (4 bytes
a weight instead of 1).

Memory: once repacked, a segment's own codes (``qweight``, as large as the repack) are released
(``release_codes``): the buffer becomes a one-element view of its shape, and ``dequantize``
recovers the exact codes from the repack (the kernel with scale 1, zero 8 times the identity
gives each code back as an integer), so the 4-bit weights sit in memory once, not twice.
``TESSELLM_CPU_INT4PACK=0`` set after a segment was repacked does not bring the codes back: that
segment keeps the int4 kernel.
"""

from __future__ import annotations


import torch

from tessellm import envs
import torch.nn.functional as F

from tessellm.backends.reference.ops import fold_out, rms_scaled
from tessellm.backends.reference.quant_ops import TorchQuantOps, _finish
from tessellm.quantization.packed import (Fp8Activation, Fp8Weight, Int4Weight, Int8Weight,
                                          PackedWeight, pack_int4, unpack_int4)

GROUPS = (32, 64, 128, 256)
REFINE = 16  # LM-head logits recomputed in float32 per row (lm_head_mm)  # what the CPU kernel accepts
_ATTR = "_cpu_int4pack"  # the repacked (codes, scale_and_zero) cached on the segment
_DENSE = "_cpu_fp8_dense"  # a block-fp8 segment's float32 weight, cached on the segment


def enabled() -> bool:
    return envs.cpu_int4pack()


def _pack(codes_nk: torch.Tensor, scale_kn: torch.Tensor, zero_kn: torch.Tensor):
    """codes int32 ``[N, K]`` in 0..15, scale/zero float32 ``[G, N]`` -> the kernel's operands."""
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes_nk.contiguous(), 2)
    sz = torch.stack([scale_kn, zero_kn], dim=-1).to(torch.bfloat16).contiguous()
    return packed, sz


def repack_int4(w: Int4Weight):
    """``(packed, scale_and_zero, group, doubled=False)``, or None when the kernel cannot run it.
    A GPTQ act-order segment's rows are already sorted by group (``perm``): its product gathers
    ``x[:, perm]`` first (``int4_mm``)."""
    if w.group_size not in GROUPS or w.out_features % 16:  # the kernel packs 16 rows a tile
        return None
    codes = unpack_int4(w.qweight).to(torch.int32).t()  # [N, K]
    scales = w.scales.float()
    zeros = scales * (8 - w.zero_point)
    if w.offsets is not None:
        zeros = zeros + w.offsets.float()
    return (*_pack(codes, scales, zeros), w.group_size, False)


def repack_int8(w: Int8Weight):
    """Grouped int8 as two int4 halves stacked along K (``doubled``: x is fed twice)."""
    g = w.group_size
    n, k = w.qweight.shape
    if g not in GROUPS or k % g or w.scales.shape[0] == 1 or n % 16:
        return None
    q = w.qweight.to(torch.int32)
    hi, lo = (q >> 4) + 8, q & 0xF  # q = 16 (hi - 8) + lo, both in 0..15
    s = w.scales.float()  # [G, N]
    codes = torch.cat([hi, lo], dim=1)  # [N, 2K]: groups never straddle the seam (K % g == 0)
    scales = torch.cat([16 * s, s], dim=0)
    zeros = torch.cat([torch.zeros_like(s), 8 * s], dim=0)
    return (*_pack(codes, scales, zeros), g, True)


def _cached(w: PackedWeight):
    packed = getattr(w, _ATTR, 0)
    if packed == 0:
        packed = repack_int4(w) if w.kind == "int4" else repack_int8(w)
        object.__setattr__(w, _ATTR, packed)  # a plain attribute: not a buffer, not saved
        if packed is not None:
            release_codes(w)
    return packed


def repacked(w: PackedWeight) -> bool:
    return getattr(w, _ATTR, None) is not None


def release_codes(w: PackedWeight) -> None:
    """Drops ``w.qweight``'s storage (the repack holds the same codes) and makes ``w.dequantize``
    rebuild them from the repack: its result is unchanged, bit for bit."""
    q = w.qweight
    w.qweight = torch.zeros((), dtype=q.dtype, device=q.device).expand(q.shape)
    cls = type(w)

    def dequantize(dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return cls.dequantize(_with_codes(w), dtype)

    object.__setattr__(w, "dequantize", dequantize)


def unpacked_codes(packed) -> torch.Tensor:
    """The repack's codes as int32 ``[N, K']`` in 0..15 (``K'``: 2K for a doubled int8 repack)."""
    codes, sz, group, _ = packed
    k = sz.shape[0] * group
    unit = torch.stack([torch.ones(sz.shape[:2]), torch.full(sz.shape[:2], 8.0)], -1)
    eye = torch.eye(k, dtype=torch.bfloat16)  # row i picks code i of every output
    w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, codes, group, unit.to(torch.bfloat16))
    return w.t().to(torch.int32)  # integers 0..15: exact in bfloat16


def _with_codes(w: PackedWeight) -> PackedWeight:
    """A copy of the released segment ``w`` with its original codes rebuilt from the repack."""
    packed = getattr(w, _ATTR)
    codes = unpacked_codes(packed)
    if w.kind == "int4":
        return Int4Weight(pack_int4(codes.t()), w.scales, w.offsets, w.zero_point, w.group_size,
                          w.perm)
    k = codes.shape[1] // 2
    q = 16 * (codes[:, :k] - 8) + codes[:, k:]  # q = 16 (hi - 8) + lo
    return Int8Weight(q.to(torch.int8), w.scales, w.group_size)


def _use_kernel(x: torch.Tensor, w: PackedWeight) -> bool:
    return repacked(w) or (enabled() and x.device.type == "cpu")


def int4pack_mm(x: torch.Tensor, packed) -> torch.Tensor:
    """``x [M, K]`` (any float dtype) times a repacked segment -> bfloat16 ``[M, N]``."""
    codes, sz, group, doubled = packed
    xb = x.to(torch.bfloat16)
    if doubled:
        xb = torch.cat([xb, xb], dim=-1)
    return torch.ops.aten._weight_int4pack_mm_for_cpu(xb, codes, group, sz)


class CpuQuantOps(TorchQuantOps):
    name = "cpu"
    # AWQ/GPTQ segments are ``Int4Weight``s: group 32-256 through the int4 kernel (act-order:
    # x gathered first), others (per channel over K not in GROUPS) through the reference slabs.
    schemes = TorchQuantOps.schemes | {"awq", "gptq"}
    quantized_lm_head = True  # the GGUF loader may hand this ops the LM head's Q8_0 blocks

    def int4_mm(self, x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
        packed = _cached(w) if _use_kernel(x, w) else None
        if packed is None:
            return super().int4_mm(x, w, bias)
        xs = x if w.perm is None else x.index_select(-1, w.perm.long())  # act-order
        return _finish(int4pack_mm(xs, packed), x.dtype, bias)

    def int8_mm(self, x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor:
        packed = _cached(w) if _use_kernel(x, w) else None
        if packed is None:
            return super().int8_mm(x, w, bias)
        return _finish(int4pack_mm(x, packed), x.dtype, bias)

    # The norm-fold pair (plugin API 24) on this backend's own fp8 product (``fp8_mm``, W8A8),
    # as ``CpuOps``' dense pair: declared, taken only under ``TESSELLM_NORM_FOLD2=1``.

    def fp8_mm_add_rms_norm_fold(self, x, w: Fp8Weight, residual, norm_weight, bias=None):
        """``reference.ops.linear_add_rms_norm_fold`` on ``fp8_mm``'s product."""
        return fold_out(self.fp8_mm(x, w, bias), residual, norm_weight)

    def fp8_mm_rms_scaled(self, x, w: Fp8Weight, sumsq, eps: float, bias=None,
                          silu_and_mul: bool = False):
        """``reference.ops.linear_rms_scaled`` on ``fp8_mm``'s product (x quantized per token,
        the sums float32, scaled before the one rounding to x's dtype)."""
        xa = Fp8Activation.quantize(x, w.qweight.dtype)
        y = self.fp8_mm_prequantized(Fp8Activation(xa.qx, xa.scales, torch.float32), w)
        return rms_scaled(y, x, sumsq, eps, bias, silu_and_mul)

    def fp8_block_mm(self, x: torch.Tensor, w: PackedWeight, bias=None) -> torch.Tensor:
        """Block-wise fp8 through its float32 weight, dequantized once (module docstring)."""
        dense = getattr(w, _DENSE, None)
        if dense is None:
            dense = w.dequantize(torch.float32)
            object.__setattr__(w, _DENSE, dense)  # a plain attribute: not a buffer, not saved
            q = w.qweight
            w.qweight = torch.zeros((), dtype=q.dtype, device=q.device).expand(q.shape)
            object.__setattr__(w, "dequantize",
                               lambda dtype=torch.float32: dense.to(dtype))
        return _finish(F.linear(x.float(), dense), x.dtype, bias)

    def lm_head_mm(self, x: torch.Tensor, w: PackedWeight, dense: torch.Tensor) -> torch.Tensor:
        """Logits from the quantized head, then the ``REFINE`` largest of each row recomputed in
        float32 from ``dense`` (the same values, which the embedding keeps anyway): bfloat16
        logits are 2^-8 apart relative (0.06 at 16), so without this near-ties become exact ties
        and greedy picks among them by index."""
        logits = getattr(self, f"{w.kind}_mm")(x, w)
        # Asked after the product, which repacks ``w`` on its first call: float32 logits from
        # the reference path (never repacked, or no kernel form) are exact already; the
        # kernel's are bfloat16 values cast back to x's float32.
        if logits.dtype == torch.float32 and not repacked(w):
            return logits
        logits = logits.float()
        top = logits.topk(min(REFINE, logits.shape[-1]), dim=-1).indices  # [M, R]
        exact = torch.bmm(dense[top].float(), x.float()[:, :, None])[..., 0]  # [M, R]
        return logits.scatter_(-1, top, exact)


_DIRECT = "_cpu_int4pack_direct"  # on a layer: (its segments list, its one segment, the repack)


def direct_apply(method) -> None:
    """Gives ``method`` (a ``QuantLinearMethod`` on ``CpuQuantOps``) an ``apply`` that runs a
    layer of one repacked segment as ``int4pack_mm(x).to(x.dtype)`` directly: the same two
    conversions and kernel call as the generic path (bitwise its result), without its dozen
    Python calls per product (segment lookup through ``nn.Module`` attributes, the dispatch by
    kind, the reshapes): ~5 us of a ~30 us batch-1 product on 2 cores. Anything else (a bias,
    several segments, x not 2-D, a segment not repacked yet) goes through the generic
    ``apply``, which repacks on first use; the direct entry is made after that call and
    dropped if the layer's segments change."""
    generic = method.apply

    def apply(layer, x: torch.Tensor, bias=None) -> torch.Tensor:
        entry = layer.__dict__.get(_DIRECT)
        if entry is not None and bias is None and isinstance(x, torch.Tensor) and x.dim() == 2:
            segs, seg, packed = entry
            if layer._modules.get("segments") is segs and segs._modules.get("0") is seg and len(segs) == 1:
                return int4pack_mm(x, packed).to(x.dtype)
        y = generic(layer, x, bias)
        segs = layer._modules.get("segments")
        if (entry is None and segs is not None and len(segs) == 1 and repacked(segs[0])
                and getattr(segs[0], "perm", None) is None):
            layer.__dict__[_DIRECT] = (segs, segs[0], getattr(segs[0], _ATTR))
        return y

    method.apply = apply
