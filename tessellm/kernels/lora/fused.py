"""LoRA shrink and expand of one projection in ONE launch, for decode-sized batches.

A decode step's LoRA cost is launches, not bytes (rank-16 adapters of one 8B layer are ~2.6 MB:
0.6 us of bandwidth against ~2 us per launch in a graph). ``lora_shrink_expand`` replaces the
split-K shrink's memset, the shrink and the expand (3 launches) by one persistent kernel of
``P`` programs (all resident at once: ``P`` <= the GPU's SMs) in two phases::

    phase 1  items (row block b, K split k), strided over the P programs:
             part[k, rows of b, :] = x[rows of b, K split k] @ lora_a[slot b, :, K split k]^T
    ------   grid barrier (sense-reversing: a counter and a generation word in meta.barrier)
    phase 2  items (row block b, N tile j of the slices), strided over the P programs:
             out[rows of b, tile j] += scaling[slot] * (sum_k part[k, rows, slice cols]) @ B^T

``part`` is float32 ``[SPLIT, L, BLOCK_RA]`` (L = padded rows of ``meta``): every split writes its
own plane, so nothing needs zeroing and no atomics touch data. Rows without an adapter are never
touched (as ``lora_expand``); the float32 sum is rounded once into ``out``.

The barrier only works when every program is resident, so the fused path is taken on CUDA for up
to ``FUSED_MAX_TOKENS`` rows with ``n * R <= 64``; elsewhere (and on ROCm) it runs the separate
shrink and expand kernels. Under TRITON_INTERPRET=1 programs run one after another: P is 1
there, which still runs every item of both phases.
"""

from __future__ import annotations

import os
from typing import Sequence

import torch
import triton
import triton.language as tl

from tessellm.kernels.lora.expand import MAX_SLICES, _block_n, _check, lora_expand_slices
from tessellm.kernels.lora.meta import LoRABatchMeta
from tessellm.kernels.lora.shrink import lora_shrink

FUSED_MAX_TOKENS = 16  # one 16-row block per adapter: decode and small verify batches
FUSED_MAX_RANK_COLS = 64  # n slices x R: the stacked A tile a program holds


@triton.jit
def _grid_barrier(bar_ptr, num_progs):
    """All ``num_progs`` programs wait here; the last to arrive resets the counter and bumps
    the generation (so the same two words serve the next launch without a memset)."""
    tl.debug_barrier()
    gen = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    old = tl.atomic_add(bar_ptr, 1, sem="acq_rel")
    if old == num_progs - 1:
        tl.atomic_xchg(bar_ptr, 0, sem="relaxed")
        tl.atomic_add(bar_ptr + 1, 1, sem="release")
    else:
        cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
        while cur == gen:
            cur = tl.atomic_add(bar_ptr + 1, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _fused_kernel(x_ptr, a_ptr, b0_ptr, b1_ptr, b2_ptr, scaling_ptr, out_ptr, part_ptr, bar_ptr,
                  sorted_ids_ptr, block_slot_ptr, num_padded_ptr, T, R, NR, K, L, num_slots,
                  num_progs, n0, n1, n2, off0, off1, off2, tiles0, tiles01, tiles_all,
                  stride_xm, stride_as, stride_ar, stride_bs0, stride_bs1, stride_bs2,
                  stride_bn0, stride_bn1, stride_bn2, stride_om,
                  SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_RA: tl.constexpr,
                  BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr,
                  DOT_PREC: tl.constexpr, DOT_FP32: tl.constexpr):
    pid = tl.program_id(0)
    num_blocks = tl.load(num_padded_ptr) // BLOCK_M
    rm = tl.arange(0, BLOCK_M)
    rc = tl.arange(0, BLOCK_RA)
    k_span = tl.cdiv(tl.cdiv(K, SPLIT), BLOCK_K) * BLOCK_K
    # Phase 1: the shrink's partial products, one K split of one row block per item.
    for item in range(pid, num_blocks * SPLIT, num_progs):
        blk = item // SPLIT
        slot = tl.load(block_slot_ptr + blk)
        if slot < num_slots:
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + rm)
            row_ok = rows < T
            x_row = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
            a_col = a_ptr + slot.to(tl.int64) * stride_as + rc[None, :].to(tl.int64) * stride_ar
            k_lo = (item % SPLIT) * k_span
            acc = tl.zeros((BLOCK_M, BLOCK_RA), dtype=tl.float32)
            for k0 in range(k_lo, tl.minimum(k_lo + k_span, K), BLOCK_K):
                rk = k0 + tl.arange(0, BLOCK_K)
                xt = tl.load(x_row + rk[None, :], mask=row_ok[:, None] & (rk[None, :] < K),
                             other=0.0)
                at = tl.load(a_col + rk[:, None], mask=(rk[:, None] < K) & (rc[None, :] < NR),
                             other=0.0)
                if DOT_FP32:  # float32, or bf16 in the interpreter (no bf16 dot there)
                    xt = xt.to(tl.float32)
                acc += tl.dot(xt, at.to(xt.dtype), input_precision=DOT_PREC)
            p = part_ptr + ((item % SPLIT) * L + blk * BLOCK_M + rm)[:, None] * BLOCK_RA
            tl.store(p + rc[None, :], acc)
    _grid_barrier(bar_ptr, num_progs)
    # Phase 2: the expand of one N tile of one slice for one row block per item.
    rr = tl.arange(0, BLOCK_R)
    for item in range(pid, num_blocks * tiles_all, num_progs):
        blk = item // tiles_all
        pid_n = item % tiles_all
        slot = tl.load(block_slot_ptr + blk)
        if slot < num_slots:
            in1, in2 = pid_n >= tiles0, pid_n >= tiles01
            n = tl.where(in2, n2, tl.where(in1, n1, n0))
            off = tl.where(in2, off2, tl.where(in1, off1, off0))
            stride_bs = tl.where(in2, stride_bs2, tl.where(in1, stride_bs1, stride_bs0)).to(tl.int64)
            stride_bn = tl.where(in2, stride_bn2, tl.where(in1, stride_bn1, stride_bn0)).to(tl.int64)
            tile = pid_n - tl.where(in2, tiles01, tl.where(in1, tiles0, 0))
            c0 = tl.where(in2, 2 * R, tl.where(in1, R, 0))  # this slice's columns of part
            if in2:
                b_ptr = b2_ptr
            elif in1:
                b_ptr = b1_ptr
            else:
                b_ptr = b0_ptr
            s = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
            p = part_ptr + (blk * BLOCK_M + rm)[:, None] * BLOCK_RA + c0 + rr[None, :]
            for ks in tl.static_range(SPLIT):
                s += tl.load(p + ks * L * BLOCK_RA, mask=rr[None, :] < R, other=0.0,
                             cache_modifier=".cg")
            rn = tile * BLOCK_N + tl.arange(0, BLOCK_N)
            b_col = b_ptr + slot.to(tl.int64) * stride_bs + rn[None, :].to(tl.int64) * stride_bn
            wt = tl.load(b_col + rr[:, None], mask=(rr[:, None] < R) & (rn[None, :] < n), other=0.0)
            if DOT_FP32:
                acc = tl.dot(s, wt.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc = tl.dot(s.to(wt.dtype), wt, input_precision=DOT_PREC)
            acc *= tl.load(scaling_ptr + slot)
            rows = tl.load(sorted_ids_ptr + blk * BLOCK_M + rm)
            o = out_ptr + rows.to(tl.int64)[:, None] * stride_om + (off + rn)[None, :]
            o_mask = (rows < T)[:, None] & (rn[None, :] < n)
            cur = tl.load(o, mask=o_mask, other=0.0).to(tl.float32)
            tl.store(o, (cur + acc).to(out_ptr.dtype.element_ty), mask=o_mask)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def fusable(x: torch.Tensor, lora_a: torch.Tensor, meta: LoRABatchMeta) -> bool:
    """Whether ``lora_shrink_expand`` takes the one-launch path for this call."""
    if meta.barrier is None or x.shape[0] > FUSED_MAX_TOKENS or lora_a.shape[1] > FUSED_MAX_RANK_COLS:
        return False
    if _interpreting():
        return True
    return x.is_cuda and not getattr(torch.version, "hip", None)


def _programs(x: torch.Tensor, meta: LoRABatchMeta, k: int, tiles_all: int, block_k: int):
    """(P, SPLIT): enough K splits that the busy blocks fill the GPU (each split >= 2 K tiles),
    and at most one program per SM so that every program is resident for the barrier."""
    if _interpreting():
        return 1, max(1, min(2, k // block_k))
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count
    busy = triton.cdiv(meta.num_tokens, meta.block_m) + min(meta.num_tokens, meta.num_slots)
    want = max(1, sms // busy)
    split = max(1, min(1 << (want.bit_length() - 1), k // (2 * block_k), 16))
    return max(1, min(sms, busy * max(split, tiles_all))), split


def lora_shrink_expand(x: torch.Tensor, lora_a: torch.Tensor, lora_bs: Sequence[torch.Tensor],
                       meta: LoRABatchMeta, scaling: torch.Tensor, out: torch.Tensor,
                       offsets: Sequence[int]) -> None:
    """``out[:, offsets[i]:+N_i] += scaling[s] * (x @ lora_a[s][i*R:(i+1)*R].T) @ lora_bs[i][s].T``
    for rows with an adapter: ``lora_shrink`` then ``lora_expand_slices``, in one launch when
    ``fusable`` (else those two kernels)."""
    t, k = x.shape
    nr = lora_a.shape[1]
    if lora_a.shape[2] != k or x.stride(1) != 1 or lora_a.stride(2) != 1:
        raise ValueError(f"lora_shrink_expand: x {tuple(x.shape)} and lora_a {tuple(lora_a.shape)} "
                         f"do not fit (want lora_a [S, R', {k}], both contiguous in the last dim).")
    if not fusable(x, lora_a, meta):
        buf = torch.empty(t, nr, dtype=torch.float32, device=x.device)
        lora_shrink(x, lora_a, meta, buf)
        lora_expand_slices(buf, lora_bs, meta, scaling, out, offsets)
        return
    _check(torch.empty(t, nr, device="meta"), lora_bs, out, offsets, scaling)
    if t == 0 or nr == 0:
        return
    r = lora_bs[0].shape[2]
    widths = [b.shape[1] for b in lora_bs]
    block_n, block_k = _block_n(widths), 32 if _interpreting() else 128
    tiles = [triton.cdiv(n, block_n) for n in widths] + [0] * (MAX_SLICES - len(widths))
    pad = lambda xs, fill: list(xs) + [fill] * (MAX_SLICES - len(xs))  # noqa: E731
    bs, ns, offs = pad(lora_bs, lora_bs[0]), pad(widths, 0), pad(offsets, 0)
    progs, split = _programs(x, meta, k, sum(tiles), block_k)
    block_ra = max(16, triton.next_power_of_2(nr))
    rows = meta.sorted_ids.numel()
    part = torch.empty(split, rows, block_ra, dtype=torch.float32, device=x.device)
    fp32 = x.dtype == torch.float32
    _fused_kernel[(progs,)](
        x, lora_a, *bs, scaling, out, part, meta.barrier, meta.sorted_ids, meta.block_slot,
        meta.num_padded, t, r, nr, k, rows, meta.num_slots, progs, *ns, *offs, tiles[0],
        tiles[0] + tiles[1], sum(tiles), x.stride(0), lora_a.stride(0), lora_a.stride(1),
        *[b.stride(0) for b in bs], *[b.stride(1) for b in bs], out.stride(0),
        SPLIT=split, BLOCK_M=meta.block_m, BLOCK_RA=block_ra,
        BLOCK_R=max(16, triton.next_power_of_2(r)), BLOCK_K=block_k, BLOCK_N=block_n,
        DOT_PREC="ieee" if fp32 else "tf32",
        DOT_FP32=fp32 or (x.dtype == torch.bfloat16 and x.device.type == "cpu"), num_warps=4)
