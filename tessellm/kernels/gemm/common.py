"""What the GEMM kernels share: the split-K epilogue, tile selection and device queries.

Split-K is deterministic in every GEMM here: each K range stores its float32 partial product in
its own plane of a ``[split, M, N]`` buffer (``_split_out``) and ``_split_sum`` adds the planes
with ``torch.sum`` over the split dimension, a reduction with a fixed order for a given shape
(float32 atomics would add the ranges in whatever order the programs finish, so two calls on
the same input could differ in the last bit)::

    K ranges    k0 ──────────── k1 ──────────── k2 ...
    programs    pid_k = 0        pid_k = 1
    planes      out[0, rm, rn]   out[1, rm, rn]   ->  y = out.sum(0).to(dtype)   (bias: plane 0)
"""

from __future__ import annotations

import functools
from typing import Optional

import torch
import triton
import triton.language as tl


@triton.jit
def _tile_ranges(K, SPLIT_K, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """This program's output tile and K range, grid ``(M tiles, N tiles, SPLIT_K)``: returns
    ``(pid_k, rows, cols, k_lo, k_hi)``, each split taking whole ``BLOCK_K`` steps of K."""
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    span = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K) * BLOCK_K
    k_lo = pid_k * span
    return pid_k, rm, rn, k_lo, tl.minimum(k_lo + span, K)


@triton.jit
def _xw_tiles(x_row, w_col, rm, rn, k0, k_hi, M, N, BLOCK_K: tl.constexpr):
    """One K step's x tile ``[BLOCK_M, BLOCK_K]`` and w tile ``[BLOCK_K, BLOCK_N]`` (w stored
    ``[N, K]``), zero outside ``M``, ``N`` and this split's ``k_hi``."""
    rk = k0 + tl.arange(0, BLOCK_K)
    k_ok = rk < k_hi
    x = tl.load(x_row + rk[None, :], mask=(rm[:, None] < M) & k_ok[None, :], other=0.0)
    w = tl.load(w_col + rk[:, None], mask=k_ok[:, None] & (rn[None, :] < N), other=0.0)
    return x, w


@triton.jit
def _epilogue(acc, out_ptr, bias_ptr, rm, rn, M, N, stride_om, stride_split, pid_k,
              HAS_BIAS: tl.constexpr):
    """acc (+ bias in split 0) to rows rm, columns rn of split ``pid_k``'s plane of out
    (``stride_split`` elements apart; 0 without split-K): a plain store, no atomics."""
    ok = (rm[:, None] < M) & (rn[None, :] < N)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
    ptrs = (out_ptr + pid_k.to(tl.int64) * stride_split + rm[:, None].to(tl.int64) * stride_om
            + rn[None, :])
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=ok)



@triton.jit
def _gemv_rows_epilogue(acc0, acc1, acc2, acc3, out_ptr, bias_ptr, rn, N, stride_om,
                        stride_split, pid_k, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                        AXIS: tl.constexpr):
    """The decode GEMVs' store of 1-4 rows (``ROWS``): row r's accumulator tile ``acc<r>``
    summed over its K axis ``AXIS`` (0 for ``[K, N]`` tiles, 1 for ``[N, K]``) to the columns
    ``rn``, plus the bias in split 0, stored to split ``pid_k``'s plane of out (rows
    ``stride_om`` apart, planes ``stride_split``); the tiles of rows past ``ROWS`` are unused."""
    bias = tl.zeros((rn.shape[0],), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        bias = bias * tl.where(pid_k == 0, 1.0, 0.0)
    out = out_ptr + pid_k.to(tl.int64) * stride_split + rn
    dt = out_ptr.dtype.element_ty
    tl.store(out, (tl.sum(acc0, axis=AXIS) + bias).to(dt), mask=rn < N)
    if ROWS > 1:
        tl.store(out + stride_om, (tl.sum(acc1, axis=AXIS) + bias).to(dt), mask=rn < N)
    if ROWS > 2:
        tl.store(out + 2 * stride_om, (tl.sum(acc2, axis=AXIS) + bias).to(dt), mask=rn < N)
    if ROWS > 3:
        tl.store(out + 3 * stride_om, (tl.sum(acc3, axis=AXIS) + bias).to(dt), mask=rn < N)

@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def _interpreted(x: torch.Tensor) -> bool:
    return x.device.type == "cpu"  # Triton runs on the CPU only through its interpreter


def _dot_args(x: torch.Tensor) -> dict:
    return dict(DOT_FP32=x.dtype == torch.bfloat16 and _interpreted(x),
                DOT_PREC="tf32x3" if x.dtype == torch.float32 else "tf32")


def _tiles(x: torch.Tensor, m: int, n: int, k: int, group: int,
           config: Optional[tuple] = None) -> dict:
    """Tile sizes, split-K and launch shape for an ``[m, k] x [k, n]`` product. ``config``:
    (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, most split-K) instead of the defaults
    (benchmarks)."""
    max_split = 16
    if config is not None:
        bm, bn, bk, warps, stages, max_split = config
    elif m <= 16:
        bm, bn, bk, warps, stages = 16, 64, 128, 4, 4
    elif m <= 64:
        bm, bn, bk, warps, stages = 64, 64, 64, 4, 4
    else:
        bm, bn, bk, warps, stages = 128, 128, 64, 8, 3
    if _interpreted(x):
        bm, bn, bk, warps, stages = 16, 32, 32, 1, 1
    if group < k:  # a K tile must stay inside one group
        bk = min(bk, group)
    tiles_mn = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = 1
    if not _interpreted(x):
        want = 2 * _num_sms(x.device.index or 0)
        while tiles_mn * split * 2 <= want and k // (bk * split * 2) >= 2 and split < max_split:
            split *= 2
    return dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, SPLIT_K=split, num_warps=warps,
                num_stages=stages, grid=(triton.cdiv(m, bm), triton.cdiv(n, bn), split))


def _split_out(x: torch.Tensor, m: int, n: int, split: int,
               dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """Where an ``[m, n]`` product is stored: ``[split, m, n]`` float32, a plane per K range,
    when ``split`` > 1 (every element written: no memset), else ``[m, n]`` in ``dtype``
    (default x's). Pass the kernel ``out.stride(-2)`` and ``_split_stride(out)``."""
    if split > 1:
        return torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    return torch.empty(m, n, dtype=dtype or x.dtype, device=x.device)


def _split_stride(out: torch.Tensor) -> int:
    """Elements between two split planes of ``_split_out``'s buffer (0: one plane)."""
    return out.stride(0) if out.dim() == 3 else 0


def _split_sum(out: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The product from ``_split_out``'s buffer: the planes summed over the split dimension
    (same order every call), cast to ``dtype``; a single plane as it is."""
    return out if out.dim() == 2 else out.sum(0).to(dtype)
