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
dense weight a product (~4.5 bytes a weight in 16 bits), the dense weight never kept. Float32
arithmetic then one rounding to x's dtype: the reference ``TorchQuantOps.bnb4_mm``'s
dequantization bit for bit.

Up to ``GEMV_MAX_M`` rows (decode) ``_bnb4_gemv_kernel`` reads the codes once instead (~0.56
bytes a weight): a program takes ``BLOCK_N`` output rows of one x row and walks K, each byte's
two weights widened through the table, scaled by their block's absmax (the two share it: the
block size is even), rounded to x's dtype (the weights the cuBLAS path multiplies) and met with
x's even and odd inputs in float32::

    acc[n] += sum_i  w(q_hi[n, i]) * x[2i] + w(q_lo[n, i]) * x[2i + 1]

More x rows re-read the codes (from L2), so the GEMV stops at a few rows. ``GEMV_MAX_M`` is 0:
the dequantize + cuBLAS path everywhere, measured faster on an H100 (session 28, us a call, L2
flushed, Llama-8B shapes, 1 row: GEMV / dequant+cuBLAS / bf16 cuBLAS: qkv 51.4 / 45.2 / 24.6,
o 41.0 / 29.6 / 18.4, gate_up 197.6 / 210.5 / 90.8, down 141.9 / 109.2 / 51.4; the GEMV read the
codes at 0.23-0.33 TB/s, and 2-4x slower again at 2 and 4 rows).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from tessellm.quantization.bnb import Bnb4Weight

BLOCK = 1024  # bytes a program (2048 weights)
GEMV_MAX_M = 0  # rows up to which bnb4_mm takes the GEMV: none (slower on an H100)
GEMV_BLOCK_N, GEMV_BLOCK_K = 16, 256


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


@triton.jit
def _bnb4_gemv_kernel(x_ptr, q_ptr, absmax_ptr, code_ptr, bias_ptr, out_ptr, N, K, stride_xm,
                      stride_om, BS: tl.constexpr, HAS_BIAS: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    m = tl.program_id(1)
    n_ok = rn < N
    row = rn[:, None].to(tl.int64)
    half_k = K // 2
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        b = k0 // 2 + tl.arange(0, BLOCK_K // 2)  # byte of the row: inputs 2b, 2b + 1
        b_ok = b < half_k
        ok = n_ok[:, None] & b_ok[None, :]
        byte = tl.load(q_ptr + row * half_k + b[None, :], mask=ok, other=0).to(tl.int32)
        scale = tl.load(absmax_ptr + (row * K + 2 * b[None, :]) // BS, mask=ok, other=0.0)
        w_hi = (tl.load(code_ptr + (byte >> 4)) * scale).to(x_ptr.dtype.element_ty)
        w_lo = (tl.load(code_ptr + (byte & 15)) * scale).to(x_ptr.dtype.element_ty)
        x_hi = tl.load(x_ptr + m * stride_xm + 2 * b, mask=b_ok, other=0.0).to(tl.float32)
        x_lo = tl.load(x_ptr + m * stride_xm + 2 * b + 1, mask=b_ok, other=0.0).to(tl.float32)
        acc += tl.sum(w_hi.to(tl.float32) * x_hi[None, :] + w_lo.to(tl.float32) * x_lo[None, :],
                      axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + m * stride_om + rn, acc.to(out_ptr.dtype.element_ty), mask=n_ok)


def bnb4_gemv(x: torch.Tensor, w: Bnb4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` reading the codes once per x row (decode)."""
    x = x.contiguous()
    m, k = x.shape
    n = w.out_features
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    _bnb4_gemv_kernel[(triton.cdiv(n, GEMV_BLOCK_N), m)](
        x, w.qweight, w.absmax, w.code, bias if bias is not None else out, out, n, k,
        x.stride(0), out.stride(0), BS=w.blocksize, HAS_BIAS=bias is not None,
        BLOCK_N=GEMV_BLOCK_N, BLOCK_K=GEMV_BLOCK_K)
    return out


def bnb4_mm(x: torch.Tensor, w: Bnb4Weight, bias=None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` in x's dtype: the GEMV up to ``GEMV_MAX_M`` rows,
    else the dequantization kernel, then ``F.linear``."""
    if 0 < x.shape[0] <= GEMV_MAX_M:
        return bnb4_gemv(x, w, bias)
    return F.linear(x, bnb4_dequantize(w, x.dtype), bias)
