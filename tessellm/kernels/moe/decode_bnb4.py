"""Fused MoE decode (a few tokens) on bitsandbytes 4-bit experts: two GEMV-style launches that
read the packed codes themselves (no dense copy of the routed experts).

The bnb4 twin of ``decode_int4.py`` (same grids, same rounding points of the activation and of
the weighted sum), for the contract's bnb4 experts (``reference/moe.py``: ``w13`` uint8 ``[E, 2I,
H/2]``, ``w2`` uint8 ``[E, H, I/2]``, two codes a byte along the inputs, high nibble first; a
float32 absmax per block of ``bs`` inputs of a row, ``[E, N, K/bs]``; the layer's 16-entry
table ``code``)::

    _moe_up_bnb4_kernel    grid (I / BLOCK_N, T * k): program (n, p) streams the bytes of rows
        n-block of the gate and of the up half of w13[ids[p]] over all of H
        -> act[p, n-block] = silu(gate) * up
    _moe_down_bnb4_kernel  grid (H / BLOCK_N, T): program (n, t) loops over the k slots of
        token t (w2[ids[t, j]][n-block] @ act[t * k + j], times the slot's weight, rounded,
        summed in float32) -> out[t, n-block]

A K step of a row is ``NB`` whole blocks (``[BLOCK_N, NB, bs/2]`` bytes, each loaded once)::

    byte j of block b  ->  inputs b bs + 2 j (code[byte >> 4]) and b bs + 2 j + 1 (code[byte & 15])
    part[n, b] = sum_j code[hi] x[b bs + 2j] + code[lo] x[b bs + 2j + 1]      acc += part * absmax

the table looked up by two loads of its 16 entries (L1 hits; the dense GEMV's fastest way,
``gemm/bnb4.py``'s ``LUT`` 0), the absmax one load a row and block. The weights are thus not
rounded to the activations' dtype one by one as the reference's dequantized matrix is: the
result equals the reference to float32 reassociation (float32 models) or to bf16 / fp16
rounding of the weights (half models). At 1 token a Qwen3-30B-A3B layer reads 8 experts x 3 x
2048 x 768 / 2 B = 18.9 MB of codes (+ 1.2 MB of absmaxes) instead of bf16's 75.5 MB, and
nothing is written but the activations.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.moe.decode_int4 import decode_operands
from tessellm.kernels.moe.decode import silu_mul_store
from tessellm.kernels.pdl import pdl_args, pdl_start

# Weight rows a program of the up and the down kernel (``fused_moe_bnb4_decode``'s ``up_rows``
# / ``down_rows``): swept on an H100 (benchmarks/README.md, session 31: one Qwen3-30B-A3B layer
# at 1 token, 47.7 us at (8, 4) against 61.3 at int4's (4, 2), 99.2 at (1, 1)).
BNB4_DECODE_ROWS = (8, 4)
# Up to this many tokens the bnb4 experts take these kernels (``fused_moe_triton``), beyond it
# the dequantized path (``bnb4_dequant.py``). Each (token, slot) pair reads its expert's codes
# once: at T tokens T * k experts' codes, against one dequantization of every expert (codes
# read, 16-bit weights written and read back: ~9x the codes' bytes) on the other path.
# Measured on an H100 (session 31, one Qwen3-30B-A3B layer): these kernels 1.6 ms at 32 tokens
# and 3.2 ms at 64 against 5.1 / 5.7 ms dequantizing; beyond 64 not measured.
# TESSELLM_MOE_BNB4_DECODE_TOKENS sets another.
BNB4_DECODE_MAX_TOKENS = 64


def bnb4_decode_max_tokens() -> int:
    value = envs.moe_bnb4_decode_tokens()
    return BNB4_DECODE_MAX_TOKENS if value is None else value


@triton.jit
def _bnb4_row_dot(rows, a_rows, code_ptr, x_row, same3, b0, KB, BS: tl.constexpr,
                  NB: tl.constexpr, EVEN_K: tl.constexpr):
    """``[BN, NB]`` float32 partial sums of one K step of ``NB`` blocks from block ``b0`` of
    the rows ``rows`` (``[BN, 1, 1]`` byte pointers): each block's ``sum code[q] x`` times its
    absmax (``a_rows``: ``[BN, 1]`` pointers to the rows' absmaxes). x is loaded in the bytes'
    shape (``same3``: ``[BN, 1, 1]`` zeros) so that it takes the tile's register layout."""
    bi = b0 + tl.arange(0, NB)[None, :, None]  # [1, NB, 1]
    kb = bi * (BS // 2) + tl.arange(0, BS // 2)[None, None, :]  # [1, NB, BS/2]: byte offsets
    if EVEN_K:
        byte = tl.load(rows + kb).to(tl.int32)
        x_hi = tl.load(x_row + same3 + 2 * kb).to(tl.float32)
        x_lo = tl.load(x_row + same3 + 2 * kb + 1).to(tl.float32)
    else:
        ok = (same3 + bi) < KB
        byte = tl.load(rows + kb, mask=ok, other=0).to(tl.int32)
        x_hi = tl.load(x_row + same3 + 2 * kb, mask=ok, other=0.0).to(tl.float32)
        x_lo = tl.load(x_row + same3 + 2 * kb + 1, mask=ok, other=0.0).to(tl.float32)
    w_hi = tl.load(code_ptr + (byte >> 4))
    w_lo = tl.load(code_ptr + (byte & 15))
    part = tl.sum(w_hi * x_hi + w_lo * x_lo, axis=2)  # [BN, NB]
    b = b0 + tl.arange(0, NB)[None, :]
    if EVEN_K:
        absmax = tl.load(a_rows + b)
    else:
        absmax = tl.load(a_rows + b, mask=b < KB, other=0.0)
    return part * absmax


@triton.jit
def _moe_up_bnb4_kernel(x_ptr, ids_ptr, w_ptr, a_ptr, code_ptr, act_ptr, I, KB, stride_xm,
                        stride_we, stride_wn, stride_ae, stride_an, stride_am,
                        TOP_K: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr,
                        EVEN_K: tl.constexpr, K_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
                        USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    pid_n, p = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + p).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, I - 1).to(tl.int64)[:, None]  # rows past I read row I-1, never stored
    gate_rows = w_ptr + expert * stride_we + (rn_ld * stride_wn)[:, :, None]
    up_rows = gate_rows + I * stride_wn
    gate_a = a_ptr + expert * stride_ae + rn_ld * stride_an
    up_a = gate_a + I * stride_an
    x_row = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm
    acc_g = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
    same3 = tl.zeros((BLOCK_N, 1, 1), dtype=tl.int32)
    for s in tl.static_range(K_STEPS):  # unrolled: every load of the program can be in flight
        acc_g += _bnb4_row_dot(gate_rows, gate_a, code_ptr, x_row, same3, s * NB, KB, BS, NB,
                               EVEN_K)
        acc_u += _bnb4_row_dot(up_rows, up_a, code_ptr, x_row, same3, s * NB, KB, BS, NB,
                               EVEN_K)
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    silu_mul_store(g, u, act_ptr + p.to(tl.int64) * stride_am, rn, I)


@triton.jit
def _moe_down_bnb4_kernel(act_ptr, ids_ptr, weights_ptr, w_ptr, a_ptr, code_ptr, out_ptr, H, KB,
                          stride_am, stride_we, stride_wn, stride_ae, stride_an, stride_om,
                          TOP_K: tl.constexpr, BS: tl.constexpr, NB: tl.constexpr,
                          EVEN_K: tl.constexpr, K_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    pid_n, t = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, H - 1).to(tl.int64)[:, None]
    dt = out_ptr.dtype.element_ty
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    same3 = tl.zeros((BLOCK_N, 1, 1), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
        rows = w_ptr + expert * stride_we + (rn_ld * stride_wn)[:, :, None]
        a_rows = a_ptr + expert * stride_ae + rn_ld * stride_an
        act_row = act_ptr + (t * TOP_K + j) * stride_am
        acc = tl.zeros((BLOCK_N, NB), dtype=tl.float32)
        for s in tl.static_range(K_STEPS):
            acc += _bnb4_row_dot(rows, a_rows, code_ptr, act_row, same3, s * NB, KB, BS, NB,
                                 EVEN_K)
        y = tl.sum(acc, axis=1) * tl.load(weights_ptr + t * TOP_K + j)
        out += y.to(dt).to(tl.float32)  # each slot's weighted row rounded, as the grouped path
    tl.store(out_ptr + t * stride_om + rn, out.to(dt), mask=rn < H)


def _tiles(k_dim: int, bs: int, interpreted: bool, rows: int) -> dict:
    """``rows`` rows a program, ``NB`` whole blocks a row a step: ``512 / rows`` bytes a row
    (as ``decode_int4``'s words), a power of two of blocks, at most the row's; as many warps as
    give every thread 16 bytes of the step's codes."""
    blocks = k_dim // bs
    step_bytes = 128 if interpreted else 2048 // rows
    nb = max(1, min(triton.next_power_of_2(blocks), step_bytes // (bs // 2)))
    nb = 1 << (nb.bit_length() - 1)  # a power of two
    warps = 1 if interpreted else max(1, min(8, rows * nb * (bs // 2) // 512))
    return dict(BLOCK_N=rows, BS=bs, NB=nb, K_STEPS=triton.cdiv(blocks, nb),
                EVEN_K=blocks % nb == 0, num_warps=warps)


def fused_moe_bnb4_decode(hidden: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          w13_absmax: torch.Tensor, w2_absmax: torch.Tensor, code: torch.Tensor,
                          up_rows: Optional[int] = None,
                          down_rows: Optional[int] = None) -> torch.Tensor:
    """``fused_moe_triton``'s contract on bnb4 experts (module docstring for the layout) in two
    launches; ``topk_ids`` local expert ids (in range). ``up_rows`` / ``down_rows``: weight
    rows a program of each kernel (default ``BNB4_DECODE_ROWS``; benchmarks sweep them)."""
    interp = envs.triton_interpret()
    default = (64, 64) if interp else BNB4_DECODE_ROWS  # interpreted: few, large programs
    up_rows, down_rows = up_rows or default[0], down_rows or default[1]
    t, k = topk_ids.shape
    h, inter = w13.shape[2] * 2, w2.shape[2] * 2
    hidden, weights, ids, act, out = decode_operands(hidden, topk_weights, topk_ids, h, inter)
    if t == 0:
        return out
    dev = hidden.device
    a13, a2 = w13_absmax.float().contiguous(), w2_absmax.float().contiguous()
    table = code.float().contiguous()
    up = _tiles(h, h // a13.shape[2], interp, up_rows)
    _moe_up_bnb4_kernel[(triton.cdiv(inter, up["BLOCK_N"]), t * k)](
        hidden, ids, w13, a13, table, act, inter, a13.shape[2], hidden.stride(0), w13.stride(0),
        w13.stride(1), a13.stride(0), a13.stride(1), act.stride(0), TOP_K=k, **up,
        **pdl_args(dev))
    down = _tiles(inter, inter // a2.shape[2], interp, down_rows)
    _moe_down_bnb4_kernel[(triton.cdiv(h, down["BLOCK_N"]), t)](
        act, ids, weights, w2, a2, table, out, h, a2.shape[2], act.stride(0), w2.stride(0),
        w2.stride(1), a2.stride(0), a2.stride(1), out.stride(0), TOP_K=k, **down,
        **pdl_args(dev))
    return out
