"""LoRA expand: ``out[t, off:off+N] += scaling[s] * (lora_b[s] @ buf[t])``, ``s = slot[t]``.

One launch per projection for the whole mixed batch, for up to three output slices at once (q, k
and v of a fused projection: slice ``i`` reads ``buf`` columns ``i*R:(i+1)*R`` and writes
``out`` columns ``offsets[i]:offsets[i]+N_i``). Grid: (row blocks, N tiles of all slices). A
program finds its slice from its tile index, loads its block's slot, gathers its rows of
``buf`` (float32 ``[BLOCK_M, R]``), multiplies them by ``lora_b_i[slot]``'s ``[BLOCK_N, R]`` tile
and adds the scaled product into its rows of ``out`` (read, add in float32, round once)::

    buf rows (gathered)  [BLOCK_M, R]  ──┐
    lora_b_i[slot]       [N_i, R]      ──┴─> out rows [BLOCK_M, off_i + n .. + BLOCK_N]

Every (row, column) of ``out`` belongs to one program: no atomics, rows without an adapter are
never touched. Tensors in, tensors out: imports neither tessellm.core nor backends.
"""

from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.lora.meta import LoRABatchMeta

MAX_SLICES = 3


@triton.jit
def _expand_kernel(buf_ptr, b0_ptr, b1_ptr, b2_ptr, scaling_ptr, out_ptr, sorted_ids_ptr,
                   block_slot_ptr, num_padded_ptr, T, R, num_slots, n0, n1, n2, off0, off1, off2,
                   tiles0, tiles01, stride_bm, stride_bk, stride_bs0, stride_bs1, stride_bs2,
                   stride_bn0, stride_bn1, stride_bn2, stride_om, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
                   DOT_FP32: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    slot = tl.load(block_slot_ptr + pid_m)
    if slot >= num_slots:  # rows without an adapter: untouched
        return
    # This tile's slice: its weights, width, output offset and buf columns.
    in1, in2 = pid_n >= tiles0, pid_n >= tiles01
    n = tl.where(in2, n2, tl.where(in1, n1, n0))
    off = tl.where(in2, off2, tl.where(in1, off1, off0))
    stride_bs = tl.where(in2, stride_bs2, tl.where(in1, stride_bs1, stride_bs0)).to(tl.int64)
    stride_bn = tl.where(in2, stride_bn2, tl.where(in1, stride_bn1, stride_bn0)).to(tl.int64)
    tile = pid_n - tl.where(in2, tiles01, tl.where(in1, tiles0, 0))
    k0 = tl.where(in2, 2 * R, tl.where(in1, R, 0))
    if in2:
        b_ptr = b2_ptr
    elif in1:
        b_ptr = b1_ptr
    else:
        b_ptr = b0_ptr
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = rows < T
    rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    buf_row = buf_ptr + rows.to(tl.int64)[:, None] * stride_bm + k0 * stride_bk
    b_col = b_ptr + slot.to(tl.int64) * stride_bs + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r0 in range(0, R, BLOCK_R):
        rk = r0 + tl.arange(0, BLOCK_R)
        bt = tl.load(buf_row + rk[None, :] * stride_bk, mask=row_ok[:, None] & (rk[None, :] < R),
                     other=0.0)
        wt = tl.load(b_col + rk[:, None], mask=(rk[:, None] < R) & (rn[None, :] < n), other=0.0)
        if DOT_FP32:  # float32 weights, or bf16 in the interpreter (no bf16 arithmetic there)
            acc += tl.dot(bt, wt.to(tl.float32), input_precision=DOT_PREC)
        else:
            acc += tl.dot(bt.to(wt.dtype), wt, input_precision=DOT_PREC)
    acc *= tl.load(scaling_ptr + slot)
    o = out_ptr + rows.to(tl.int64)[:, None] * stride_om + (off + rn)[None, :]
    o_mask = row_ok[:, None] & (rn[None, :] < n)
    cur = tl.load(o, mask=o_mask, other=0.0).to(tl.float32)
    tl.store(o, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _block_n(widths: Sequence[int]) -> int:
    if envs.triton_interpret():
        return 32
    return 128 if max(widths) >= 2048 else 64


def _check(buf, lora_bs, out, offsets, scaling) -> None:
    t, width = buf.shape
    r = lora_bs[0].shape[2] if lora_bs else 0
    ok = 1 <= len(lora_bs) <= MAX_SLICES and len(offsets) == len(lora_bs)
    ok = ok and width == r * len(lora_bs) and out.shape[0] == t
    ok = ok and all(b.shape[2] == r and b.shape[0] == lora_bs[0].shape[0] for b in lora_bs)
    ok = ok and all(0 <= o and o + b.shape[1] <= out.shape[1] for b, o in zip(lora_bs, offsets))
    if not ok:
        raise ValueError(
            f"lora_expand: buf {tuple(buf.shape)}, lora_b {[tuple(b.shape) for b in lora_bs]}, "
            f"out {tuple(out.shape)} and offsets {list(offsets)} do not fit (want 1 to "
            f"{MAX_SLICES} lora_b [S, N_i, R] with buf [T, R x slices] and out_offset + N_i <= "
            f"out's columns).")
    if any(b.stride(2) != 1 for b in lora_bs) or out.stride(1) != 1:
        raise ValueError("lora_expand needs lora_b and out contiguous in their last dim.")
    if scaling.dtype != torch.float32 or any(b.dtype != lora_bs[0].dtype for b in lora_bs):
        raise ValueError("lora_expand needs float32 scaling and one dtype for every lora_b.")


def lora_expand_slices(buf: torch.Tensor, lora_bs: Sequence[torch.Tensor], meta: LoRABatchMeta,
                       scaling: torch.Tensor, out: torch.Tensor, offsets: Sequence[int]) -> None:
    """``buf`` float32 ``[T, R x len(lora_bs)]`` (any strides), each ``lora_bs[i] [S, N_i, R]``
    (last dim contiguous), ``scaling`` float32 ``[S]``, ``out [T, N_total]`` (last dim
    contiguous): for rows with an adapter, ``out[:, offsets[i]:offsets[i] + N_i] +=
    scaling[s] * buf[:, i*R:(i+1)*R] @ lora_bs[i][s].T``, one launch for all slices."""
    _check(buf, lora_bs, out, offsets, scaling)
    t, r = buf.shape[0], lora_bs[0].shape[2]
    if t == 0 or r == 0:
        return
    widths = [b.shape[1] for b in lora_bs]
    block_n = _block_n(widths)
    tiles = [triton.cdiv(n, block_n) for n in widths] + [0] * (MAX_SLICES - len(widths))
    pad = lambda xs, fill: list(xs) + [fill] * (MAX_SLICES - len(xs))  # noqa: E731
    bs, ns, offs = pad(lora_bs, lora_bs[0]), pad(widths, 0), pad(offsets, 0)
    fp32 = lora_bs[0].dtype == torch.float32
    grid = (meta.block_slot.numel(), sum(tiles))
    _expand_kernel[grid](
        buf, *bs, scaling, out, meta.sorted_ids, meta.block_slot, meta.num_padded, t, r,
        meta.num_slots, *ns, *offs, tiles[0], tiles[0] + tiles[1], buf.stride(0), buf.stride(1),
        *[b.stride(0) for b in bs], *[b.stride(1) for b in bs], out.stride(0),
        BLOCK_M=meta.block_m, BLOCK_N=block_n, BLOCK_R=min(64, max(16, triton.next_power_of_2(r))),
        DOT_PREC="ieee" if fp32 else "tf32",
        DOT_FP32=fp32 or (lora_bs[0].dtype == torch.bfloat16 and buf.device.type == "cpu"),
        num_warps=4)


def lora_expand(buf: torch.Tensor, lora_b: torch.Tensor, meta: LoRABatchMeta,
                scaling: torch.Tensor, out: torch.Tensor, out_offset: int = 0) -> None:
    """One slice: ``out[:, out_offset:out_offset + N] += scaling[s] * buf @ lora_b[s].T``."""
    lora_expand_slices(buf, [lora_b], meta, scaling, out, [out_offset])
