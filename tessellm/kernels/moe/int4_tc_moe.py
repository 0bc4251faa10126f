"""Tensor-core grouped GEMM for AWQ / GPTQ int4 MoE experts (the dense ``gemm/int4_tc.py``'s
arithmetic on the experts' own layout, no re-layout): ``fused_moe._expert_gemm`` hands it its
int4 products where K and the group are multiples of 128 (``moe_int4_tc_applies``).

The experts' codes are int32 ``[E, N, K/8]`` (nibble i of word w = input ``8 w + i``): a
128-input block of an output row is 16 contiguous words, and nibble i of them is the inputs
``128 b + 8 j + i`` (j = 0..15), a strided 16-input slab. x is therefore put in the slabs'
order once per product (``slab_order``: ``xs[:, 128 b + 16 i + j] = x[:, 128 b + 8 j + i]``, one
copy of the activations, or with GPTQ act order the per-expert ``perm`` gathered the same way,
so the kernel reads x through it), and each K step is::

    words  = w[e, rn, 16 b : 16 b + 16]                     [BLOCK_N, 16] int32 (64 B a row)
    for i in 0..7:
        w_i  = (words >> 4 i) & 15 | 0x4300  as bf16          = 128 + q (fp16: 0x6400, 1024 + q)
        part = dot(w_i, xs[pairs, 128 b + 16 i : +16].T, part)   [BLOCK_N, BLOCK_M] float32
        xsum += the slab's column sums
    acc += scale[e, rn, g] * (part - (C + zero[e, rn, g]) * xsum)      (zero 8 without zeros)

with the weight as the left operand (on Hopper's wgmma it stays in registers; the block's
16-128 pairs are the MMA's N). Codes are exact in the dot and the scale is applied in float32,
so the products differ from the reference's (which rounds each dequantized weight to the model
dtype before its matmul) by that rounding only: float32 equal to reassociation. The epilogue is
``_expert_gemm_kernel``'s (SiLU-and-mul of the gate and up halves at its rounding points, the
routing weight, rows stored by pair).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.pdl import pdl_args, pdl_start

MOE_INT4_TC = True  # default of TESSELLM_MOE_INT4_TC


def moe_int4_tc_applies(k: int, group: int) -> bool:
    """Whether fused_moe's int4 grouped GEMMs take this kernel: on (``MOE_INT4_TC`` /
    TESSELLM_MOE_INT4_TC), K and the group multiples of 128 (whole 128-input blocks, one group
    a block)."""
    on = envs.moe_int4_tc()
    return (MOE_INT4_TC if on is None else on) and k > 0 and k % 128 == 0 and group % 128 == 0


_ORDERS: dict = {}  # (k, device) -> slab_order's tensor, made outside graph capture


def slab_order(k: int, device) -> torch.Tensor:
    """int64 ``[K]``: column ``128 b + 16 i + j`` of the slab order holds input ``128 b + 8 j +
    i`` (nibble i of word j of block b). Kept per (K, device) once made eagerly (the engine's
    warm-up), so a captured step has no launches for it."""
    key = (k, str(device))
    order = _ORDERS.get(key)
    if order is None:
        idx = torch.arange(k, device=device).view(k // 128, 16, 8)  # [b, j, i] = 128b + 8j + i
        order = idx.transpose(1, 2).reshape(k).contiguous()
        capturing = (torch.device(device).type == "cuda"
                     and torch.cuda.is_current_stream_capturing())
        if not capturing:
            _ORDERS[key] = order
    return order


@triton.jit
def _moe_int4_tc_kernel(a_ptr, w_ptr, c_ptr, s_ptr, z_ptr, weight_ptr, perm_ptr,
                        sorted_ids_ptr, block_expert_ptr, num_padded_ptr, N, K, num_pairs,
                        stride_am, stride_we, stride_wn, stride_cm, stride_se, stride_sn,
                        A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                        SILU_MUL: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_PERM: tl.constexpr,
                        GROUP_SIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        W16: tl.constexpr, CODE0: tl.constexpr, DOT_FP32: tl.constexpr,
                        DOT_PREC: tl.constexpr, USE_PDL: tl.constexpr):
    """Grid ``(blocks of BLOCK_M sorted pairs, N / BLOCK_N)``. ``a`` in the slab order
    (``slab_order``), or HAS_PERM: ``a`` as it is and ``perm`` ``[E, K]`` int32 (act order) in
    the slab order, gathered per expert. CODE0: what a widened code reads as less the code
    (128, 1024 or 0), plus 8 without HAS_ZEROS. W16: 1 bf16 / 2 fp16 codes by bits, 0 ``.to``."""
    pdl_start(USE_PDL)
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_ok = pairs < num_pairs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = rn < N
    rj = tl.arange(0, 16)
    a_col = a_ptr + (pairs // A_ROW_DIV).to(tl.int64)[None, :] * stride_am  # [1, BLOCK_M]
    w_row = w_ptr + expert * stride_we + rn[:, None].to(tl.int64) * stride_wn + rj[None, :]
    s_row = expert * stride_se + rn.to(tl.int64) * stride_sn  # [BLOCK_N] offsets (zeros too)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    acc_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)  # unused unless SILU_MUL
    for b in range(0, K // 128):
        words = tl.load(w_row + b * 16, mask=n_ok[:, None], other=0)
        words_up = words
        if SILU_MUL:
            words_up = tl.load(w_row + N * stride_wn + b * 16, mask=n_ok[:, None], other=0)
        part = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        part_up = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for i in tl.static_range(8):
            col = b * 128 + 16 * i + rj  # [16], the slab order
            if HAS_PERM:
                col = tl.load(perm_ptr + expert * K + col)
            xi = tl.load(a_col + col[:, None], mask=row_ok[None, :], other=0.0)  # [16, BM]
            if DOT_FP32:
                xi = xi.to(tl.float32)
            part = tl.dot(_widen(words, i, W16, xi.dtype).to(xi.dtype), xi, part,
                          input_precision=DOT_PREC)
            if SILU_MUL:
                part_up = tl.dot(_widen(words_up, i, W16, xi.dtype).to(xi.dtype), xi, part_up,
                                 input_precision=DOT_PREC)
            xsum += tl.sum(xi.to(tl.float32), axis=0)
        g = (b * 128) // GROUP_SIZE
        s = tl.load(s_ptr + s_row + g, mask=n_ok, other=0.0).to(tl.float32)
        c0 = tl.zeros((BLOCK_N,), dtype=tl.float32) + CODE0
        if HAS_ZEROS:
            c0 += tl.load(z_ptr + s_row + g, mask=n_ok, other=0).to(tl.float32)
        acc += s[:, None] * (part - c0[:, None] * xsum[None, :])
        if SILU_MUL:
            s_up = tl.load(s_ptr + s_row + N * stride_sn + g, mask=n_ok, other=0.0).to(tl.float32)
            c0_up = tl.zeros((BLOCK_N,), dtype=tl.float32) + CODE0
            if HAS_ZEROS:
                c0_up += tl.load(z_ptr + s_row + N * stride_sn + g, mask=n_ok,
                                 other=0).to(tl.float32)
            acc_up += s_up[:, None] * (part_up - c0_up[:, None] * xsum[None, :])
    dt = c_ptr.dtype.element_ty
    if SILU_MUL:  # the reference's rounding points: gate/up, SiLU and product each in C's dtype
        gate = acc.to(dt).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32) * acc_up.to(dt).to(tl.float32)
    if MUL_WEIGHT:
        acc *= tl.load(weight_ptr + pairs, mask=row_ok, other=0.0)[None, :]
    c = c_ptr + pairs.to(tl.int64)[None, :] * stride_cm + rn[:, None]
    tl.store(c, acc.to(dt), mask=row_ok[None, :] & n_ok[:, None])


@triton.jit
def _widen(words, i: tl.constexpr, W16: tl.constexpr, dtype: tl.constexpr):
    """Nibble i of each word as the dot's operand: 128 + q (bf16) / 1024 + q (fp16) by bits,
    or q by ``.to`` (W16 0)."""
    codes = (words >> (4 * i)) & 0xF
    if W16 == 1:
        w = (codes | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    elif W16 == 2:
        w = (codes | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
    else:
        w = codes.to(dtype)
    return w


def moe_int4_tc_block_m(pairs: int, num_experts: int) -> int:
    """The alignment block (pairs a program takes; SiLU-and-mul in GEMM 1's epilogue at both)
    of the fused MoE where both int4 GEMMs take this kernel: 16 up to 16 pairs an expert, 32
    above, in place of the 16-bit rule (``fused_moe._tiles``: 32 from 2, 64 unfused from 32).
    H100 sweep (session 22, ``bench_moe_int4.py --flush --sweep``, Qwen3-30B-A3B layer: only
    BLOCK_M and the fusion of its tiles reach this kernel): 256 tokens (16 pairs an expert)
    332.7 us at 16 against 387.4 at the rule's 32; 2048 tokens (128) 1,569.6 at 32 against
    1,648.7 at the rule's 64 unfused."""
    return 16 if pairs <= 16 * num_experts else 32


def moe_int4_tc_tiles(block_m: int) -> dict:
    """Launch settings by the alignment block (the pairs a program takes, ``fused_moe._tiles``'
    BLOCK_M): 128 weight rows, 4 warps up to 64 pairs, 8 above. H100 sweep (session 20,
    Qwen3-30B-A3B layer, benchmarks/int4tc_device.sh): BLOCK_N 128 with 4 warps was the best at
    16, 64 and 256 tokens (185.9 / 255.9 / 372.0 us against 202.5 / 287.1 / 443.7 for the first
    settings, BLOCK_N 64 up to 32 pairs and 128 with 8 warps above)."""
    if block_m <= 64:
        return dict(BLOCK_N=128, num_warps=4, num_stages=3)
    return dict(BLOCK_N=128, num_warps=8, num_stages=3)


def moe_int4_tc_gemm(a, w, scale, zeros, weights, sorted_ids, block_expert, num_padded, out,
                     row_div: int, block_m: int, silu_mul: bool, perm=None) -> None:
    """``fused_moe._expert_gemm``'s int4 product through ``_moe_int4_tc_kernel``: ``out`` rows
    by pair (``silu_mul``: the activation of ``w``'s gate and up halves, ``out`` half as wide).
    ``a`` as the caller holds it (put in the slab order here, or act order's ``perm`` ``[E, K]``
    composed with it)."""
    k = w.shape[2] * 8
    group = k // scale.shape[2]
    order = slab_order(k, a.device)
    interp = a.device.type == "cpu"
    if perm is not None:
        perm = perm.index_select(1, order).to(torch.int32).contiguous()
    else:
        a = a.index_select(1, order)
    n = out.shape[1]
    w16 = {torch.bfloat16: 1, torch.float16: 2}.get(a.dtype, 0)  # bits (interpreter too)
    t = dict(BLOCK_N=32, num_warps=1, num_stages=1) if interp else moe_int4_tc_tiles(block_m)
    grid = (sorted_ids.numel() // block_m, triton.cdiv(n, t["BLOCK_N"]))
    _moe_int4_tc_kernel[grid](
        a, w, out, scale, zeros if zeros is not None else scale,
        weights if weights is not None else scale, perm if perm is not None else sorted_ids,
        sorted_ids, block_expert, num_padded, n, k, out.shape[0], a.stride(0), w.stride(0),
        w.stride(1), out.stride(0), scale.stride(0), scale.stride(1), A_ROW_DIV=row_div,
        MUL_WEIGHT=weights is not None, SILU_MUL=silu_mul, HAS_ZEROS=zeros is not None,
        HAS_PERM=perm is not None, GROUP_SIZE=group, BLOCK_M=block_m, W16=w16,
        CODE0=float((0, 128, 1024)[w16] + (0 if zeros is not None else 8)),
        DOT_FP32=a.dtype == torch.bfloat16 and interp,
        DOT_PREC="ieee" if a.dtype == torch.float32 else "tf32", **t, **pdl_args(a.device))
