"""LoRA expand: ``out[t, off:off+N] += scaling[s] * (lora_b[s] @ buf[t])``, ``s = slot[t]``.

One launch per projection slice for the whole mixed batch. Grid: (row blocks, N tiles). A
program loads its block's slot, gathers its rows of ``buf`` (float32 ``[BLOCK_M, R]``, the
shrink's output or a column slice of it), multiplies them by ``lora_b[slot]``'s ``[BLOCK_N, R]``
tile and adds the scaled product into its rows of ``out`` (read, add in float32, round once)::

    buf rows (gathered)  [BLOCK_M, R]  ──┐
    lora_b[slot]         [N, R]        ──┴─> out rows [BLOCK_M, off + n .. off + n + BLOCK_N]

Every (row, column) of ``out`` belongs to one program: no atomics, rows without an adapter are
never touched. Tensors in, tensors out: imports neither tessellm.core nor backends.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from tessellm.kernels.lora.meta import LoRABatchMeta


@triton.jit
def _expand_kernel(buf_ptr, b_ptr, scaling_ptr, out_ptr, sorted_ids_ptr, block_slot_ptr,
                   num_padded_ptr, T, N, R, num_slots, out_offset, stride_bm, stride_bk,
                   stride_bs, stride_bn, stride_om, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m)
    if slot >= num_slots:  # rows without an adapter: untouched
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < T
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    buf_row = buf_ptr + rows.to(tl.int64)[:, None] * stride_bm
    b_col = b_ptr + slot.to(tl.int64) * stride_bs + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rk = r0 + tl.arange(0, BLOCK_R)
        bt = tl.load(buf_row + rk[None, :] * stride_bk, mask=row_ok[:, None] & (rk[None, :] < R),
                     other=0.0)
        wt = tl.load(b_col + rk[:, None], mask=(rk[:, None] < R) & (rn[None, :] < N), other=0.0)
        if DOT_FP32:  # float32 weights, or bf16 in the interpreter (no bf16 arithmetic there)
            acc += tl.dot(bt, wt.to(tl.float32), input_precision=DOT_PREC)
        else:
            acc += tl.dot(bt.to(wt.dtype), wt, input_precision=DOT_PREC)
    acc *= tl.load(scaling_ptr + slot)
    o = out_ptr + rows.to(tl.int64)[:, None] * stride_om + (out_offset + rn)[None, :]
    o_mask = row_ok[:, None] & (rn[None, :] < N)
    cur = tl.load(o, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _tiles(n: int) -> dict:
    if os.environ.get("TRITON_INTERPRET") == "1":
        return dict(BLOCK_N=32)
    return dict(BLOCK_N=128 if n >= 2048 else 64, num_warps=4, num_stages=2)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta,
                scaling: torch.Tensor, out: torch.Tensor, out_offset: int = 0) -> None:
    """``buf`` float32 ``[T, R]`` (any strides), ``lora_b [S, N, R]`` (last dim contiguous),
    ``scaling`` float32 ``[S]``, ``out [T, N_total]`` (last dim contiguous): adds the scaled
    LoRA product into ``out[:, out_offset:out_offset + N]`` for rows with an adapter."""
    t, r = buf.shape
    n = lora_b.shape[1]
    if lora_b.shape[2] != r or out.shape[0] != t or out_offset < 0 or out_offset + n > out.shape[1]:
        raise ValueError(f"lora_expand: buf {tuple(buf.shape)}, lora_b {tuple(lora_b.shape)}, out "
                         f"{tuple(out.shape)} and out_offset {out_offset} do not fit (want lora_b "
                         f"[S, N, {r}] and out_offset + N <= out's columns).")
    if lora_b.stride(2) != 1 or out.stride(1) != 1 or scaling.dtype != torch.float32:
        raise ValueError("lora_expand needs lora_b and out contiguous in their last dim and "
                         "float32 scaling.")
    if t == 0 or n == 0 or r == 0:
        return
    tiles = _tiles(n)
    fp32 = lora_b.dtype == torch.float32
    grid = (meta.block_slot.numel(), triton.cdiv(n, tiles["BLOCK_N"]))
    _expand_kernel[grid](
        buf, lora_b, scaling, out, meta.sorted_ids, meta.block_slot, meta.num_padded, t, n, r,
        meta.num_slots, out_offset, buf.stride(0), buf.stride(1), lora_b.stride(0),
        lora_b.stride(1), out.stride(0), BLOCK_M=meta.block_m,
        BLOCK_R=min(64, max(16, triton.next_power_of_2(r))), DOT_PREC="ieee" if fp32 else "tf32",
        DOT_FP32=fp32 or (lora_b.dtype == torch.bfloat16 and buf.device.type == "cpu"), **tiles)
