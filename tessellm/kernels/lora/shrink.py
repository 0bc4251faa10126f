"""LoRA shrink: ``out[t] = lora_a[slot[t]] @ x[t]`` (float32) over a batch of mixed adapters.

One launch per projection for the whole batch (SGMV over the slot-grouped rows of
``meta.LoRABatchMeta``; a decode batch is the same kernel with 1-row groups in 16-row blocks).
Grid: (row blocks, rank tiles, SPLIT_K). A program loads its block's slot, gathers its rows of
``x`` and multiplies them by ``lora_a[slot]``'s ``[BLOCK_N, K]`` tile, over its share of K::

    x rows (gathered)  [BLOCK_M, K]  ──┐
    lora_a[slot]       [R, K]        ──┴─> out rows [BLOCK_M, R]  (split-K: plane pid_k)

K is large (the hidden size) and R small (the rank): split-K spreads a decode batch's few blocks
over the GPU. With split-K each K range writes its own float32 plane of a ``[split, T, R]``
buffer and ``torch.sum`` adds the planes into ``out``: the same bits every call (float32 atomics
would add in the order the programs finish). Rows without an adapter are written 0 by their
blocks (in every plane). Tensors in, tensors out: imports neither tessellm.core nor backends.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.lora.meta import LoRABatchMeta

_SMS = 132  # programs to fill an H100/H200; a smaller GPU is just oversubscribed


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr, num_padded_ptr,
                   T, R, K, num_slots, stride_xm, stride_as, stride_ar, stride_om, stride_on,
                   stride_split, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, pid_n, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m)
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < T
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    o = (out_ptr + pid_k.to(tl.int64) * stride_split + rows.to(tl.int64)[:, None] * stride_om
         + rn[None, :] * stride_on)
    o_mask = row_ok[:, None] & (rn[None, :] < R)
    if slot >= num_slots:  # rows without an adapter
        tl.store(o, tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32), mask=o_mask)
        return
    x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    a_col = a_ptr + slot.to(tl.int64) * stride_as + rn[None, :].to(tl.int64) * stride_ar
    k_span = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
    k_lo = pid_k * k_span
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_lo, tl.minimum(k_lo + k_span, K), BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        xt = tl.load(x_row + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K), other=0.0)
        at = tl.load(a_col + rk[:, None], mask=(rk[:, None] < K) & (rn[None, :] < R), other=0.0)
        if DOT_FP32:  # the interpreter's bf16 dot is wrong: widen the tiles there
            xt = xt.to(tl.float32)
        acc += tl.dot(xt, at.to(xt.dtype), input_precision=DOT_PREC)
    tl.store(o, acc, mask=o_mask)


def _split_k(meta: LoRABatchMeta, k: int, rank_tiles: int, block_k: int) -> int:
    """Enough K-splits that the batch's busy blocks fill the GPU, each split >= 2 K tiles."""
    t, m = meta.num_tokens, meta.block_m
    busy = triton.cdiv(t, m) + min(t, meta.num_slots)  # upper bound on blocks with work
    want = max(1, _SMS // (busy * rank_tiles))
    return max(1, min(1 << (want.bit_length() - 1), k // (2 * block_k), 32))


def _tiles(dtype: torch.dtype) -> dict:
    if envs.triton_interpret():
        return dict(BLOCK_K=32)
    if getattr(torch.version, "hip", None):  # 64 KiB of LDS on MI300: smaller K tiles
        return dict(BLOCK_K=64, num_warps=4, num_stages=2)
    return dict(BLOCK_K=128 if dtype != torch.float32 else 64, num_warps=4, num_stages=3)


def lora_shrink(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta,
                out: torch.Tensor, split_k: Optional[int] = None) -> None:
    """``x [T, K]``, ``lora_a [S, R, K]`` (x's dtype, last dim contiguous), ``out`` float32
    ``[T, R]``: ``out[t] = lora_a[slot[t]] @ x[t]``, 0 for rows of slot -1. ``split_k``: K
    splits (default: by the batch size; > 1 costs a ``[split, T, R]`` float32 buffer and its sum
    into ``out``)."""
    t, k = x.shape
    r = lora_a.shape[1]
    if lora_a.shape[2] != k or out.shape != (t, r) or out.dtype != torch.float32:
        raise ValueError(f"lora_shrink: x {tuple(x.shape)}, lora_a {tuple(lora_a.shape)} and out "
                         f"{out.dtype} {tuple(out.shape)} do not fit (want lora_a [S, R, {k}], "
                         f"out float32 [{t}, R]).")
    if x.stride(1) != 1 or lora_a.stride(2) != 1:
        raise ValueError("lora_shrink needs x and lora_a contiguous in their last dim.")
    if t == 0 or r == 0:
        return
    tiles = _tiles(x.dtype)
    block_n = min(64, max(16, triton.next_power_of_2(r)))
    rank_tiles = triton.cdiv(r, block_n)
    split_k = split_k or _split_k(meta, k, rank_tiles, tiles["BLOCK_K"])
    dst = torch.empty(split_k, t, r, dtype=torch.float32, device=x.device) if split_k > 1 else out
    grid = (meta.block_slot.numel(), rank_tiles, split_k)
    _shrink_kernel[grid](
        x, lora_a, dst, meta.sorted_ids, meta.block_slot, meta.num_padded, t, r, k,
        meta.num_slots, x.stride(0), lora_a.stride(0), lora_a.stride(1), dst.stride(-2),
        dst.stride(-1), dst.stride(0) if split_k > 1 else 0, SPLIT_K=split_k, BLOCK_M=meta.block_m, BLOCK_N=block_n,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32",
        DOT_FP32=x.dtype == torch.bfloat16 and x.device.type == "cpu", **tiles)
    if split_k > 1:
        torch.sum(dst, 0, out=out)  # the planes, in a fixed order
