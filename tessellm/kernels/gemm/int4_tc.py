"""Tensor-core W4A16 GEMM for dense AWQ / GPTQ int4 weights at 5 rows and more (Marlin's idea,
in Triton): the codes re-laid once at load so each K step is one wide load and a shift per
tensor-core operand, the product taken with the weight as the *left* operand.

The checkpoint layout (``packed.Int4Weight.qweight``, int32 ``[K/8, N]``, nibble j of word r =
input ``8r + j``) makes a ``[BLOCK_K, BLOCK_N]`` weight tile out of 8 shifted copies of a word
tile stacked along K, a reshape that costs a layout conversion through shared memory every step
(``weight_only._int4_gemm_kernel``). The "tc" layout (``int4_tc_pack``, the cuda backend's
``TritonQuantOps.prepare_int4`` at load) stores each output row's words contiguously along K,
in blocks of 128 inputs (16 words), nibble i of word j of block b = input ``128 b + 16 i + j``::

    qt[n, 16 b + j] = q[128b + j] | q[128b + 16 + j] << 4 | ... | q[128b + 112 + j] << 28

so nibble i of the block's 16 words is the *contiguous* slab of inputs ``128 b + 16 i ..
+ 16``: one tensor-core K step. The kernel computes ``y.T = W @ x.T`` tile by tile (the swap
that Marlin-style kernels make for small M: the weight is the operand that may live in registers
on Hopper's wgmma, the few token rows become the MMA's N, 16 and up)::

    words  = qt[rn, 16b : 16b + 16]                       [BLOCK_N, 16] int32, one load a step
    for i in 0..7:                                        (unrolled)
        w_i  = (words >> 4i) & 15 | 0x4300   as bf16      = 128 + q, exact (0x6400: fp16, 1024 + q)
        part = dot(w_i, x[rm, 128b + 16i : +16].T, part)  [BLOCK_N, BLOCK_M] float32
        xs  += x slab's column sums                       [BLOCK_M]
    acc += scale[g, rn] * (part - (C + zero_point) * xs)  (+ offset[g, rn] * xs: AWQ / asym)

The code's bias ``C`` (128 or 1024, the exponent trick) and the zero point come off once per
block through the column sums of x instead of a subtraction per weight: per weight, a shift, an
AND and an OR (one LOP3) and the 16-bit move; the scale is applied per block in float32 (a
block never straddles a group: ``group_size`` is a multiple of 128). Products of bf16 codes
with x are exact in float32; the subtraction cancels about 128/8 of the magnitude (a few ulps
of float32, far under bf16's rounding of the result).

Small M is bound by the weight read: K is split over ``SPLIT_K`` programs (each range's float32
partial in its own plane, summed after: deterministic, ``common._split_sum``) until the grid
fills the GPU. Tiles by rows (``int4_tc_config``): 16/32/64 token columns, 128 from 65 rows.
Weights whose K or group is not a multiple of 128 keep the checkpoint layout and its kernels.
No host sync: graph-capture safe. On the CPU it runs in Triton's interpreter (tests), with the
same bit widening; there the bf16 operands are then widened to float32 for the dot (the
interpreter has no bf16 arithmetic; codes and x convert exactly).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.gemm.common import (_gemv_rows_epilogue, _interpreted, _num_sms,
                                          _split_out, _split_stride, _split_sum)
from tessellm.kernels.pdl import pdl_args, pdl_start
from tessellm.quantization.packed import Int4Weight, unpack_int4, unpack_int4_tc

TC_BLOCK_K = 128  # inputs a block of the tc layout: 8 slabs of 16 (one tensor-core K step each)
TC_WORDS = TC_BLOCK_K // 8


def tc_layout_ok(k: int, group: int) -> bool:
    """Whether a ``[N, K]`` int4 weight in groups of ``group`` can take the tc layout."""
    return k > 0 and k % TC_BLOCK_K == 0 and group % TC_BLOCK_K == 0


def int4_tc_pack(qweight: torch.Tensor, chunk: int = 2048) -> torch.Tensor:
    """The checkpoint layout's words ``[K/8, N]`` -> the tc layout ``[N, K/8]`` (module
    docstring), column chunks of ``chunk`` at a time (bounded scratch on the GPU)."""
    kw, n = qweight.shape
    k = kw * 8
    if k % TC_BLOCK_K:
        raise ValueError(f"the int4 tc layout needs K a multiple of {TC_BLOCK_K}, got {k}")
    out = torch.empty(n, kw, dtype=torch.int32, device=qweight.device)
    shifts = torch.arange(0, 32, 4, dtype=torch.int64, device=qweight.device)
    for c0 in range(0, n, chunk):
        q = unpack_int4(qweight[:, c0:c0 + chunk]).to(torch.int64)  # [K, c]
        c = q.shape[1]
        q = q.reshape(k // TC_BLOCK_K, 8, TC_WORDS, c)  # [b, i, j, n]: input 128b + 16i + j
        word = (q << shifts[None, :, None, None]).sum(dim=1)  # [b, j, n], disjoint bits
        word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
        out[c0:c0 + c] = word.reshape(kw, c).t()
    return out


def int4_tc_unpack(qt: torch.Tensor) -> torch.Tensor:
    """The tc layout ``[N, K/8]`` -> codes uint8 ``[K, N]`` (``packed.unpack_int4_tc``)."""
    return unpack_int4_tc(qt)


@triton.jit
def _int4_tc_kernel(x_ptr, qt_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, M, N, K,
                    stride_xm, stride_qn, stride_sg, stride_og, stride_om, stride_split,
                    GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                    HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, W16: tl.constexpr,
                    CODE0: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PREC: tl.constexpr,
                    EVEN_N: tl.constexpr):
    """Grid ``(N / BLOCK_N, M / BLOCK_M, SPLIT_K)``; each split takes whole 128-input blocks.
    W16: 1 bf16 x (codes widened by bits), 2 fp16 x (same), 0 (float32 x, or bf16 in the
    interpreter: DOT_FP32) by ``.to``; CODE0: what a widened code reads as less the code (128,
    1024 or 0) plus the zero point, taken off per block through x's column sums. EVEN_N: N % BLOCK_N == 0 (no N mask on the words)."""
    pid_n, pid_m, pid_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rn = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N),
                           BLOCK_N)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rj = tl.arange(0, 16)
    blocks = K // 128
    span = tl.cdiv(blocks, SPLIT_K)
    b_lo = pid_k * span
    b_hi = tl.minimum(b_lo + span, blocks)
    m_ok = rm[None, :] < M
    x_col = x_ptr + rm[None, :].to(tl.int64) * stride_xm + rj[:, None]  # [16, BLOCK_M]
    q_row = qt_ptr + rn[:, None].to(tl.int64) * stride_qn + rj[None, :]  # [BLOCK_N, 16]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        if EVEN_N:
            words = tl.load(q_row + b * 16)
        else:
            words = tl.load(q_row + b * 16, mask=rn[:, None] < N, other=0)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        xs = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in tl.static_range(8):
            xi = tl.load(x_col + (b * 128 + 16 * i), mask=m_ok, other=0.0)  # [16, BLOCK_M]
            codes = (words >> (4 * i)) & 0xF
            if W16 == 1:
                wi = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            elif W16 == 2:
                wi = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            else:
                wi = codes.to(tl.float32)
            if DOT_FP32:
                xi = xi.to(tl.float32)
            wi = wi.to(xi.dtype)
            part = tl.dot(wi, xi, part, input_precision=DOT_PREC)
            xs += tl.sum(xi.to(tl.float32), axis=0)
        g = (b * 128) // GROUP_SIZE
        if EVEN_N:
            s = tl.load(s_ptr + g * stride_sg + rn).to(tl.float32)
        else:
            s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += s[:, None] * (part - CODE0 * xs[None, :])
        if HAS_OFFSETS:
            if EVEN_N:
                off = tl.load(o_ptr + g * stride_og + rn).to(tl.float32)
            else:
                off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)
            acc += off[:, None] * xs[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rn, mask=rn < N, other=0.0).to(tl.float32)
        acc += tl.where(pid_k == 0, 1.0, 0.0) * bias[:, None]
    ptrs = (out_ptr + pid_k.to(tl.int64) * stride_split + rm[None, :].to(tl.int64) * stride_om
            + rn[:, None])
    tl.store(ptrs, acc.to(out_ptr.dtype.element_ty), mask=(rn[:, None] < N) & m_ok)


@triton.jit
def _int4_tc_dequant_kernel(qt_ptr, s_ptr, o_ptr, out_ptr, N, K, stride_qn, stride_sg,
                            stride_og, GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                            HAS_OFFSETS: tl.constexpr, BLOCK_N: tl.constexpr):
    """out ``[N, K]`` (x's dtype) = the dense weight from the tc layout, one 128-input block of
    ``BLOCK_N`` rows a program (for the large-M cuBLAS path): each slab stored as it unpacks."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    b = tl.program_id(1)
    rj = tl.arange(0, 16)
    n_ok = rn[:, None] < N
    words = tl.load(qt_ptr + rn[:, None].to(tl.int64) * stride_qn + b * 16 + rj[None, :],
                    mask=n_ok, other=0)
    g = (b * 128) // GROUP_SIZE
    s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    off = s
    if HAS_OFFSETS:
        off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)[:, None]
    row = out_ptr + rn[:, None].to(tl.int64) * K + b * 128 + rj[None, :]
    for i in tl.static_range(8):
        # the code under float32's exponent of 2^23 reads as 2^23 + q: exact, no I2F
        w = ((((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
             - (8388608.0 + ZERO_POINT)) * s
        if HAS_OFFSETS:
            w += off
        tl.store(row + 16 * i, w.to(out_ptr.dtype.element_ty), mask=n_ok)


@triton.jit
def _tc_row_step(acc, words, s, off, x_blk, rj, ZERO_POINT: tl.constexpr,
                 HAS_OFFSETS: tl.constexpr):
    """acc ``[BLOCK_N, 16]`` += one row's products with a block's words ``[BLOCK_N, 16]``:
    nibble i of word j meets input ``16 i + j`` of the block (``x_blk``: x's row at the block),
    loaded ``[16]`` and broadcast along N, so every tile stays in the words' register layout."""
    qx = tl.zeros(words.shape, dtype=tl.float32)
    xw = tl.zeros((16,), dtype=tl.float32)
    for i in tl.static_range(8):
        x = tl.load(x_blk + 16 * i + rj).to(tl.float32)
        # nibble i under float32's exponent of 2^23 reads as 2^23 + q: exact, no I2F
        q = ((((words >> (4 * i)) & 0xF) | 0x4B000000).to(tl.float32, bitcast=True)
             - 8388608.0)
        qx += q * x[None, :]
        xw += x
    if HAS_OFFSETS:
        return acc + s[:, None] * qx + off[:, None] * xw[None, :]
    return acc + s[:, None] * (qx - ZERO_POINT * xw[None, :])


@triton.jit
def _int4_tc_gemv_kernel(x_ptr, qt_ptr, s_ptr, o_ptr, bias_ptr, out_ptr, N, K,
                         stride_xm, stride_qn, stride_sg, stride_og, stride_om, stride_split,
                         GROUP_SIZE: tl.constexpr, ZERO_POINT: tl.constexpr,
                         HAS_OFFSETS: tl.constexpr, HAS_BIAS: tl.constexpr, ROWS: tl.constexpr,
                         SPLIT_K, BLOCK_N: tl.constexpr, EVEN_N: tl.constexpr,
                         USE_PDL: tl.constexpr):
    """The decode GEMV (1-4 rows, no tensor cores) on the tc layout: grid ``(N / BLOCK_N,
    SPLIT_K)``, each split whole 128-input blocks; a block is one ``[BLOCK_N, 16]`` word load
    (64 bytes a row), its nibble i met with x's contiguous 16 inputs ``16 i ..`` of the block,
    a float32 FMA a code and row (``gemv_int4.py``'s arithmetic, in this layout)."""
    pdl_start(USE_PDL)
    pid_n, pid_k = tl.program_id(0), tl.program_id(1)
    rn = tl.max_contiguous(tl.multiple_of(pid_n * BLOCK_N + tl.arange(0, BLOCK_N), BLOCK_N),
                           BLOCK_N)
    rj = tl.arange(0, 16)
    blocks = K // 128
    span = tl.cdiv(blocks, SPLIT_K)
    b_lo = pid_k * span
    b_hi = tl.minimum(b_lo + span, blocks)
    q_row = qt_ptr + rn[:, None].to(tl.int64) * stride_qn + rj[None, :]
    acc0 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, 16), dtype=tl.float32)
    for b in range(b_lo, b_hi):
        g = (b * 128) // GROUP_SIZE
        if EVEN_N:
            words = tl.load(q_row + b * 16)
            s = tl.load(s_ptr + g * stride_sg + rn).to(tl.float32)
            off = s  # (unused without offsets)
            if HAS_OFFSETS:
                off = tl.load(o_ptr + g * stride_og + rn).to(tl.float32)
        else:
            words = tl.load(q_row + b * 16, mask=rn[:, None] < N, other=0)
            s = tl.load(s_ptr + g * stride_sg + rn, mask=rn < N, other=0.0).to(tl.float32)
            off = s
            if HAS_OFFSETS:
                off = tl.load(o_ptr + g * stride_og + rn, mask=rn < N, other=0.0).to(tl.float32)
        x_blk = x_ptr + b * 128
        acc0 = _tc_row_step(acc0, words, s, off, x_blk, rj, ZERO_POINT, HAS_OFFSETS)
        if ROWS > 1:
            acc1 = _tc_row_step(acc1, words, s, off, x_blk + stride_xm, rj, ZERO_POINT,
                                HAS_OFFSETS)
        if ROWS > 2:
            acc2 = _tc_row_step(acc2, words, s, off, x_blk + 2 * stride_xm, rj, ZERO_POINT,
                                HAS_OFFSETS)
        if ROWS > 3:
            acc3 = _tc_row_step(acc3, words, s, off, x_blk + 3 * stride_xm, rj, ZERO_POINT,
                                HAS_OFFSETS)
    _gemv_rows_epilogue(acc0, acc1, acc2, acc3, out_ptr, bias_ptr, rn, N, stride_om,
                        stride_split, pid_k, HAS_BIAS, ROWS, AXIS=1)


GEMV_PROGRAMS_PER_SM = 8  # the tc GEMV splits K until the grid has about this many an SM


def int4_tc_gemv_config(m: int, n: int, k: int, interpreted: bool, num_sms: int = 132,
                        config: Optional[tuple] = None) -> dict:
    """``(BLOCK_N, num_warps, programs a multiprocessor)`` by shape alone: 64 rows of words
    (16 a row: 8 a thread at 4 warps), K split in powers of two while the grid has fewer than
    ``GEMV_PROGRAMS_PER_SM`` programs an SM and each split keeps 2 blocks. Not swept yet."""
    bn, warps, pps = config or (64, 4, GEMV_PROGRAMS_PER_SM)
    if interpreted:
        bn, warps = 32, 1
    blocks = k // TC_BLOCK_K
    tiles = triton.cdiv(n, bn)
    split = 1
    if not interpreted:
        while tiles * split * 2 <= pps * num_sms and blocks // (split * 2) >= 2 and split < 16:
            split *= 2
    while split > 1 and (split - 1) * triton.cdiv(blocks, split) >= blocks:
        split -= 1
    return dict(BLOCK_N=bn, SPLIT_K=split, EVEN_N=n % bn == 0, num_warps=warps,
                grid=(tiles, split))


def int4_tc_gemv(x: torch.Tensor, w: Int4Weight, bias=None, split: Optional[int] = None,
                 config: Optional[tuple] = None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` for 1-4 rows from ``w.tc_qweight`` (no tensor
    cores). ``split`` (tests) forces SPLIT_K; ``config``: ``int4_tc_gemv_config``'s tuple."""
    qt = _tc_codes(w)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.contiguous()
    m, k = x.shape
    if not 1 <= m <= 4:
        raise ValueError(f"int4_tc_gemv takes 1 to 4 rows, got {m}; use int4_tc_gemm.")
    n = qt.shape[0]
    interp = _interpreted(x)
    t = int4_tc_gemv_config(m, n, k, interp, 1 if interp else _num_sms(x.device.index or 0),
                            config)
    if split is not None:
        t["SPLIT_K"], t["grid"] = split, (t["grid"][0], split)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    offsets = w.offsets if w.offsets is not None else w.scales
    _int4_tc_gemv_kernel[grid](
        x, qt, w.scales, offsets, bias if bias is not None else x, out, n, k,
        x.stride(0), qt.stride(0), w.scales.stride(0), offsets.stride(0), out.stride(-2),
        _split_stride(out), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
        HAS_OFFSETS=w.offsets is not None, HAS_BIAS=bias is not None, ROWS=m, **t,
        **pdl_args(x.device))
    return _split_sum(out, x.dtype)


def _tc_codes(w: Int4Weight) -> torch.Tensor:
    if w.tc_qweight is None:
        raise ValueError("the int4 tc kernels need the weight in the tc layout (w.tc_qweight, "
                         "made by TritonQuantOps.prepare_int4 at load); use weight_only.int4_gemm "
                         "or gemv_int4.")
    return w.tc_qweight


def int4_tc_config(m: int, n: int, k: int, interpreted: bool, num_sms: int = 132,
                   config: Optional[tuple] = None) -> dict:
    """Tiles by rows, by shape alone (graph-capture safe): ``(BLOCK_M, BLOCK_N, num_warps,
    num_stages, programs a multiprocessor to reach by splitting K)``. Token columns 16 / 32 /
    64 / 128 by M; 64 weight rows (one warpgroup's wgmma M) up to 64 rows, 128 with 8 warps
    above. K is split in powers of two while the grid has fewer than ``pps * num_sms``
    programs and each split keeps at least 2 blocks. Swept on an H100 (session 20,
    benchmarks/int4tc_device.sh): BLOCK_N 128 at 33-64 rows; no other setting won by 10%."""
    if config is not None:
        bm, bn, warps, stages, pps = config
    elif m <= 16:
        bm, bn, warps, stages, pps = 16, 64, 4, 4, 4
    elif m <= 32:
        bm, bn, warps, stages, pps = 32, 64, 4, 4, 4
    elif m <= 64:  # H100 sweep at 64 rows: BLOCK_N 128 o 26.5 -> 22.7 us, gate_up 102 -> 84
        bm, bn, warps, stages, pps = 64, 128, 4, 3, 2
    else:
        bm, bn, warps, stages, pps = 128, 128, 8, 3, 1
    if interpreted:
        bm, bn, warps, stages = 16, 32, 1, 1
    blocks = k // TC_BLOCK_K
    tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
    split = 1
    if not interpreted:
        while tiles * split * 2 <= pps * num_sms and blocks // (split * 2) >= 2 and split < 16:
            split *= 2
    # every split must own at least one block: a smaller split where cdiv leaves the last empty
    while split > 1 and (split - 1) * triton.cdiv(blocks, split) >= blocks:
        split -= 1
    return dict(BLOCK_M=bm, BLOCK_N=bn, SPLIT_K=split, EVEN_N=n % bn == 0, num_warps=warps,
                num_stages=stages, grid=(triton.cdiv(n, bn), triton.cdiv(m, bm), split))


def _w16(x: torch.Tensor) -> int:
    """W16 by x's dtype: codes widened by bits for 16-bit x, the interpreter included (there
    the bf16 codes are then widened to float32 for its float32 dot: exact)."""
    return {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0)


def int4_tc_gemm(x: torch.Tensor, w: Int4Weight, bias=None, split: Optional[int] = None,
                 config: Optional[tuple] = None) -> torch.Tensor:
    """``x [M, K] @ dequant(w).T (+ bias)`` from ``w.tc_qweight`` (the tc layout, set by
    ``TritonQuantOps.prepare_int4``). ``split`` (tests) forces SPLIT_K; ``config``:
    ``int4_tc_config``'s tuple (benchmarks)."""
    qt = _tc_codes(w)
    if w.perm is not None:
        x = x.index_select(-1, w.perm)
    x = x.contiguous()
    m, k = x.shape
    n = qt.shape[0]
    interp = _interpreted(x)
    t = int4_tc_config(m, n, k, interp, 1 if interp else _num_sms(x.device.index or 0), config)
    if split is not None:
        t["SPLIT_K"] = split
        t["grid"] = t["grid"][:2] + (split,)
    grid, split = t.pop("grid"), t["SPLIT_K"]
    out = _split_out(x, m, n, split)
    offsets = w.offsets if w.offsets is not None else w.scales
    w16 = _w16(x)
    _int4_tc_kernel[grid](
        x, qt, w.scales, offsets, bias if bias is not None else x, out, m, n, k,
        x.stride(0), qt.stride(0), w.scales.stride(0), offsets.stride(0), out.stride(-2),
        _split_stride(out), GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point,
        HAS_OFFSETS=w.offsets is not None, HAS_BIAS=bias is not None, W16=w16,
        CODE0=float((0, 128, 1024)[w16] + w.zero_point),
        DOT_FP32=x.dtype == torch.bfloat16 and interp,
        DOT_PREC="ieee" if x.dtype == torch.float32 else "tf32", **t)
    return _split_sum(out, x.dtype)


def int4_tc_dequantize(w: Int4Weight, dtype: torch.dtype) -> torch.Tensor:
    """The dense ``[N, K]`` weight in ``dtype`` from the tc layout (rows in the permuted input
    order, as ``weight_only.int4_dequantize``)."""
    qt = w.tc_qweight
    n, kw = qt.shape
    k = kw * 8
    out = torch.empty(n, k, dtype=dtype, device=qt.device)
    offsets = w.offsets if w.offsets is not None else w.scales
    bn = 32 if _interpreted(out) else 64
    _int4_tc_dequant_kernel[(triton.cdiv(n, bn), k // TC_BLOCK_K)](
        qt, w.scales, offsets, out, n, k, qt.stride(0), w.scales.stride(0), offsets.stride(0),
        GROUP_SIZE=w.group_size, ZERO_POINT=w.zero_point, HAS_OFFSETS=w.offsets is not None,
        BLOCK_N=bn)
    return out
