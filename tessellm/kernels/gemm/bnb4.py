"""bitsandbytes 4-bit (NF4 / FP4) weights: dequantize in one Triton kernel, then the 16-bit GEMM.

The format (``quantization/bnb.py``): the weight's flattened values in blocks of ``BS``, codes two
a byte (first value in the high nibble), each value ``code[q] * absmax[j // BS]`` with ``code``
the 16-entry table of the type. One program widens ``BLOCK`` bytes into ``2 * BLOCK``
consecutive values of the dense ``[N, K]`` weight (x's dtype)::

    byte i  --> (i, 0): q = byte >> 4    j = 2i       out[j] = code[q] * absmax[j // BS]
            --> (i, 1): q = byte & 15    j = 2i + 1

a ``[BLOCK, 2]`` tile, so loads and the store are contiguous; the table (64 bytes) and absmax
come through the cache. ``bnb4_mm`` then lets cuBLAS multiply (``F.linear``), the form the int4
path takes from ``DEQUANT_MIN_M`` rows: one read of the codes, one write and one read of the
dense weight a product, the dense weight never kept. (No fused decode GEMV yet: at one row this
reads ~4.5x the bytes a fused kernel would; not timed on a GPU.)

Float32 arithmetic then one rounding to x's dtype: the reference ``TorchQuantOps.bnb4_mm``'s
dequantization bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessellm.quantization.bnb import Bnb4Weight

BLOCK = 1024  # bytes a program (2048 weights)


@triton.jit
def _bnb4_dequant_kernel(q_ptr, absmax_ptr, code_ptr, out_ptr, n_bytes,
                         BS: tl.constexpr, BLOCK: tl.constexpr):
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = i < n_bytes
    byte = tl.load(q_ptr + i, mask=ok, other=0).to(tl.int32)
    half = tl.arange(0, 2)
    nib = tl.where(half[None, :] == 0, byte[:, None] >> 4, byte[:, None] & 15)  # [BLOCK, 2]
    j = 2 * i[:, None] + half[None, :]
    ok2 = ok[:, None] & (half[None, :] < 2)
    code = tl.load(code_ptr + nib, mask=ok2, other=0.0)
    scale = tl.load(absmax_ptr + j // BS, mask=ok2, other=0.0)
    tl.store(out_ptr + j, (code * scale).to(out_ptr.dtype.element_ty), mask=ok2)


def bnb4_dequantize(w: Bnb4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype``."""
    q = w.qweight.contiguous()
    out = torch.empty(w.out_features, w.in_features, dtype=dtype, device=q.device)
    n_bytes = q.numel()
    _bnb4_dequant_kernel[(triton.cdiv(n_bytes, BLOCK),)](q, w.absmax, w.code, out, n_bytes,
                                                         BS=w.blocksize, BLOCK=BLOCK)
    return out


def bnb4_mm(x: torch.Tensor, w: Bnb4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` in x's dtype: the kernel, then ``F.linear``."""
    return F.linear(x, bnb4_dequantize(w, x.dtype), bias)
