"""Quantized GEMMs in plain torch: the cpu backend's ``QuantOps``.

Each op dequantizes a slab of output columns at a time and multiplies it, so the temporary
dense slab stays small (cache-sized) and the full dense weight never exists::

    for columns n0..n1 (about _SLAB_ELEMS weights):
        w = dequantize(packed[:, n0:n1])         # [n1 - n0, K] in x's dtype
        y[:, n0:n1] = x @ w.T

They run on any torch device (the math is the dequantize-then-matmul definition), which also
makes them the reference the Triton kernels are tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm.backends.reference.ops import ReferenceOps, fold_out, rms_scaled
from tessellm.kernels.op_flags import QUANT_OPS_FLAGS, drop_unowned_flags
from tessellm.quantization.bnb import Bnb4Weight, dequantize_bnb4
from tessellm.quantization.fp8_block import Fp8BlockWeight, dequantize_block
from tessellm.quantization.packed import Fp8Activation, Fp8Weight, Int4Weight, Int8Weight

_SLAB_ELEMS = 1 << 19  # weights dequantized per slab


def _slabs(n: int, k: int):
    step = max(16, (_SLAB_ELEMS // max(k, 1)) // 16 * 16)
    for n0 in range(0, n, step):
        yield n0, min(n, n0 + step)


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    # bf16/fp16 GEMMs on the cpu are slow and lossy; accumulate in float32 there.
    return torch.float32 if x.device.type == "cpu" else x.dtype


class TorchQuantOps:
    name = "torch"
    schemes = frozenset({"int8", "fp8", "fp8_block", "gguf", "bitsandbytes"})

    def __init_subclass__(cls, **kwargs):
        """The one rule of optional flags (``op_flags.drop_unowned_flags``); ``QuantOps``
        has none yet (``op_flags.QUANT_OPS_FLAGS``): one added there is dropped from a subclass
        that replaces its op."""
        super().__init_subclass__(**kwargs)
        drop_unowned_flags(cls, QUANT_OPS_FLAGS)

    def int8_mm(self, x: torch.Tensor, w: Int8Weight, bias=None) -> torch.Tensor:
        n, k = w.qweight.shape
        ct = _compute_dtype(x)
        xc = x.to(ct)
        out = torch.empty(x.shape[0], n, dtype=ct, device=x.device)
        per_channel = w.scales.shape[0] == 1
        for n0, n1 in _slabs(n, k):
            q = w.qweight[n0:n1].to(ct)
            if per_channel:
                torch.matmul(xc, q.t(), out=out[:, n0:n1])
            else:
                s = w.scales[:, n0:n1].t().to(ct)  # [n, G]
                wd = (q.view(n1 - n0, s.shape[1], -1) * s[..., None]).view(n1 - n0, k)
                torch.matmul(xc, wd.t(), out=out[:, n0:n1])
        if per_channel:
            out.mul_(w.scales[0].to(ct))
        return _finish(out, x.dtype, bias)

    def int4_mm(self, x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
        if w.perm is not None:
            x = x.index_select(-1, w.perm.long())
        k8, n = w.qweight.shape
        k = k8 * 8
        ct = _compute_dtype(x)
        xc = x.to(ct)
        out = torch.empty(x.shape[0], n, dtype=ct, device=x.device)
        shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)[None, :, None]
        groups = k // w.group_size
        for n0, n1 in _slabs(n, k):
            q = (_shr(w.qweight[:, None, n0:n1], shifts) & 0xF).to(ct)  # [K/8, 8, n]
            q = q.view(groups, w.group_size, n1 - n0)
            if w.zero_point:
                q.sub_(w.zero_point)
            q.mul_(w.scales[:, None, n0:n1].to(ct))
            if w.offsets is not None:
                q.add_(w.offsets[:, None, n0:n1].to(ct))
            torch.matmul(xc, q.view(k, n1 - n0), out=out[:, n0:n1])
        return _finish(out, x.dtype, bias)

    def fp8_mm(self, x: torch.Tensor, w: Fp8Weight, bias=None) -> torch.Tensor:
        """W8A8 emulated exactly: both operands rounded to fp8, products summed in float32."""
        return self.fp8_mm_prequantized(Fp8Activation.quantize(x, w.qweight.dtype), w, bias)

    def fp8_mm_prequantized(self, xa: Fp8Activation, w: Fp8Weight, bias=None) -> torch.Tensor:
        """The optional ``QuantOps`` member (and its oracle): ``fp8_mm``'s product for an
        activation its producer already quantized per token, in ``xa.dtype``."""
        n, k = w.qweight.shape
        xf = xa.qx.float()
        out = torch.empty(xf.shape[0], n, dtype=torch.float32, device=xf.device)
        for n0, n1 in _slabs(n, k):
            torch.matmul(xf, w.qweight[n0:n1].float().t(), out=out[:, n0:n1])
        out.mul_(xa.scales).mul_(w.scales[None, :])
        return _finish(out, xa.dtype, bias)

    def fp8_block_mm(self, x: torch.Tensor, w: Fp8BlockWeight, bias=None) -> torch.Tensor:
        """Block-wise fp8, weight-only (W8A16): each slab of whole row blocks dequantized
        (``q * s`` in float32, then the compute dtype) and multiplied; x is not quantized, so
        the product is the dequantized checkpoint's. The Triton kernels' W8A8 form has its own
        oracle, ``quantization.fp8_block.w8a8_block_reference``."""
        n, k = w.qweight.shape
        bn = w.block[0]
        ct = _compute_dtype(x)
        xc = x.to(ct)
        out = torch.empty(x.shape[0], n, dtype=ct, device=x.device)
        step = max(bn, (_SLAB_ELEMS // max(k, 1)) // bn * bn)  # whole row blocks per slab
        for n0 in range(0, n, step):
            n1 = min(n, n0 + step)
            wd = dequantize_block(w.qweight[n0:n1], w.scales[n0 // bn:-(-n1 // bn)], w.block, ct)
            torch.matmul(xc, wd.t(), out=out[:, n0:n1])
        return _finish(out, x.dtype, bias)

    def bnb4_mm(self, x: torch.Tensor, w: Bnb4Weight, bias=None) -> torch.Tensor:
        """bitsandbytes 4-bit (``quantization/bnb.py``): each slab of rows dequantized
        (``code[q] * absmax`` in float32, then the compute dtype) and multiplied: the
        dequantized checkpoint's product. The oracle of the Triton ``gemm/bnb4.py``."""
        n, k = w.out_features, w.in_features
        ct = _compute_dtype(x)
        xc = x.to(ct)
        out = torch.empty(x.shape[0], n, dtype=ct, device=x.device)
        for n0, n1 in _slabs(n, k):
            wd = dequantize_bnb4(w.qweight[n0:n1], w.absmax, w.code, w.blocksize, ct, n0)
            torch.matmul(xc, wd.t(), out=out[:, n0:n1])
        return _finish(out, x.dtype, bias)

    def fp8_w8a8_rows(self, rows: int) -> bool:
        """The optional ``QuantOps`` member: ``fp8_mm`` quantizes x per token at every M."""
        return True


def _shr(words: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Arithmetic right shift of int32 words. ``torch.bitwise_right_shift`` rather than ``>>``:
    torch-xla 2.9 lowers the operator ``>>`` of a negative int32 as a division rounded toward
    zero (``-634788036 >> 4`` gave -39674252, not -39674253), which corrupts the high codes of
    every word with bit 31 set; the function lowers to XLA's arithmetic shift."""
    return torch.bitwise_right_shift(words, shifts)


def _finish(out: torch.Tensor, dtype: torch.dtype, bias) -> torch.Tensor:
    out = out.to(dtype)
    return out if bias is None else out.add_(bias)


def int4_mm_whole(x: torch.Tensor, w: Int4Weight, bias=None) -> torch.Tensor:
    """``TorchQuantOps.int4_mm`` without slabs, for tracing compilers (the tpu backend's XLA):
    the whole weight dequantized in x's dtype by one elementwise chain, then one matmul, so the
    traced graph is a fixed handful of ops per layer that the compiler can fuse into the dot's
    operand, instead of a Python loop of slab writes::

        codes [K/8, N] int32 --(>> 4j) & 15--> q [G, group, N] --(q * s + z)--> w [K, N];  x @ w

    with ``z = offsets - zero_point * s`` (per group, ``[G, N]``). Same values as the slab form
    up to the order of the float sums (one matmul instead of one per slab)."""
    if w.perm is not None:
        x = x.index_select(-1, w.perm.long())
    k8, n = w.qweight.shape
    dt = _compute_dtype(x)
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=x.device)[None, :, None]
    q = (_shr(w.qweight[:, None, :], shifts) & 0xF).to(dt)  # [K/8, 8, N]
    q = q.view(k8 * 8 // w.group_size, w.group_size, n)
    s = w.scales.to(dt)
    z = -w.zero_point * s if w.zero_point else None
    if w.offsets is not None:
        z = w.offsets.to(dt) if z is None else z + w.offsets.to(dt)
    wd = q * s[:, None, :] if z is None else torch.addcmul(z[:, None, :], q, s[:, None, :])
    return _finish(torch.matmul(x.to(dt), wd.view(k8 * 8, n)), x.dtype, bias)


def dense_reference(x: torch.Tensor, w_dense: torch.Tensor, bias=None) -> torch.Tensor:
    """``x @ w.T (+ bias)`` in float32, cast back: what every quantized op must approximate."""
    return F.linear(x.float(), w_dense.float(), None if bias is None else bias.float()).to(x.dtype)


def fp8_mm_silu_and_mul(x: torch.Tensor, w: Fp8Weight, bias=None) -> torch.Tensor:
    """The oracle of the optional ``QuantOps.fp8_mm_silu_and_mul``: the weight dequantized
    (``qweight * scales``), x unquantized (W8A16, as decode runs it), the product in float32,
    rounded to x's dtype, then ``ReferenceOps.silu_and_mul``. Not a ``TorchQuantOps`` member:
    the cpu backend keeps its unfused path."""
    wd = w.qweight.float() * w.scales.float()[:, None]
    y = F.linear(x.float(), wd, None if bias is None else bias.float()).to(x.dtype)
    return ReferenceOps().silu_and_mul(y)


def fp8_mm_add_rms_norm(x: torch.Tensor, w: Fp8Weight, residual: torch.Tensor,
                        norm_weight: torch.Tensor, eps: float, bias=None):
    """The oracle of the optional ``QuantOps.fp8_mm_add_rms_norm``: ``fp8_mm_silu_and_mul``'s
    W8A16 product (the weight dequantized, float32, rounded to x's dtype), then
    ``ReferenceOps.fused_add_rms_norm`` with ``residual``: ``(normed, product + residual)``."""
    wd = w.qweight.float() * w.scales.float()[:, None]
    y = F.linear(x.float(), wd, None if bias is None else bias.float()).to(x.dtype)
    return ReferenceOps().fused_add_rms_norm(y, residual, norm_weight, eps)


def fp8_mm_add_rms_norm_fold(x: torch.Tensor, w: Fp8Weight, residual: torch.Tensor,
                             norm_weight: torch.Tensor, bias=None):
    """The oracle of the optional ``QuantOps.fp8_mm_add_rms_norm_fold``:
    ``reference.ops.linear_add_rms_norm_fold`` on the W8A16 product (the weight dequantized,
    float32, rounded to x's dtype): ``(round(h * norm_weight), sumsq, h)``."""
    wd = w.qweight.float() * w.scales.float()[:, None]
    y = F.linear(x.float(), wd, None if bias is None else bias.float()).to(x.dtype)
    return fold_out(y, residual, norm_weight)


def fp8_mm_rms_scaled(x: torch.Tensor, w: Fp8Weight, sumsq: torch.Tensor, eps: float,
                      bias=None, silu_and_mul: bool = False) -> torch.Tensor:
    """The oracle of the optional ``QuantOps.fp8_mm_rms_scaled``: ``reference.ops.
    linear_rms_scaled`` on the dequantized weight."""
    wd = w.qweight.float() * w.scales.float()[:, None]
    return rms_scaled(F.linear(x.float(), wd), x, sumsq, eps, bias, silu_and_mul)
