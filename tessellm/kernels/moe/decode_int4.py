"""Fused MoE decode (a few tokens) on AWQ / GPTQ int4 experts (W4A16): two GEMV-style launches.

The int4 twin of ``decode.py`` (same grids, same rounding points of the activation and of the
weighted sum), for the contract's int4 experts (``reference/moe.py``: ``w13`` int32 ``[E, 2I,
H/8]``, ``w2`` int32 ``[E, H, I/8]``, 8 codes a word along the inputs, low nibble first; group
scales ``[E, N, K/g]`` and uint8 zero codes of that shape, or 8 without)::

    _moe_up_int4_kernel    grid (I / BLOCK_N, T * k): program (n, p) streams the packed words of
        rows n-block of the gate and of the up half of w13[ids[p]] over all of H
        -> act[p, n-block] = silu(gate) * up
    _moe_down_int4_kernel  grid (H / BLOCK_N, T): program (n, t) loops over the k slots of
        token t (w2[ids[t, j]][n-block] @ act[t * k + j], times the slot's weight, rounded,
        summed in float32) -> out[t, n-block]

Each program loads every packed word once (``[BLOCK_N, NG, WPG, 1]`` int32: a K step of NG runs
of WPG words, each run inside one group; 4 words = 16 bytes a thread), unpacks its 8 nibbles in
registers (``[BLOCK_N, NG, WPG, 8]``) and meets them with the 8 inputs of x under the word (one
16-byte load in bf16); a run's products are summed first, ``scale * (sum q x - zero * sum x)``,
so a scale and a zero are one load a row and run (g a multiple of 8). The weights are thus not
rounded to the activations' dtype one by one as the reference's dequantized matrix is: the
result equals the reference to float32 reassociation (float32 models) or to bf16 / fp16
rounding of the weights (half models); the grouped GEMMs (``fused_moe.py``) keep the
reference's per-weight rounding. At 1 token a Qwen3-30B-A3B layer
reads 8 experts x 3 x 2048 x 768 / 2 B = 18.9 MB of codes (+ 0.9 MB of scales and zeros)
instead of bf16's 75.5 MB.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.moe.decode import silu_mul_store
from tessellm.kernels.pdl import pdl_args, pdl_start

# Weight rows a program of the up and the down kernel (``fused_moe_int4_decode``'s
# ``up_rows`` / ``down_rows`` override; benchmarks/kernels/bench_moe_int4.py --sweep times others).
# (4, 2) was the fastest of six at 1 token on an H100 for both Qwen3-30B-A3B (22.7 us against 24.1
# for 2, 2) and Mixtral-8x7B (163.2 against 168.8): benchmarks/results/h100-2026-12-06-s19/moeint4dec.
INT4_DECODE_ROWS = (4, 2)


@triton.jit
def _int4_row_dot(w_rows, s_rows, z_rows, x_row, same4, k0, KWORDS, GROUP: tl.constexpr,
                  HAS_ZEROS: tl.constexpr, WPG: tl.constexpr, NG: tl.constexpr,
                  EVEN_K: tl.constexpr, perm_row=None, HAS_PERM: tl.constexpr = False):
    """``[BN, NG]`` float32 partial sums of one K step of ``NG * WPG`` packed words from word
    ``k0`` of the rows ``w_rows`` (``[BN, 1, 1, 1]`` pointers), in ``NG`` runs of ``WPG`` words
    that each lie in one group: ``scale * (sum q x - zero * sum x)`` over the run's 8 WPG inputs
    (``scale``, ``zero``: the run's group's, one load a row and run). The words are loaded once
    (``[BN, NG, WPG, 1]``) and their 8 nibbles unpacked in registers (``[BN, NG, WPG, 8]``); x
    is loaded in that shape (``same4``: ``[BN, 1, 1, 1]`` zeros) so that it takes the tile's
    register layout. ``s_rows`` / ``z_rows``: ``[BN, 1]`` pointers to the rows' scales and
    zeros. HAS_PERM (GPTQ act order): input i of the row is x[perm_row[i]]."""
    gi = tl.arange(0, NG)
    kw = k0 + gi[None, :, None, None] * WPG + tl.arange(0, WPG)[None, None, :, None]
    nib = tl.arange(0, 8)[None, None, None, :]
    k4 = kw * 8 + nib  # [1, NG, WPG, 8] input offsets
    if HAS_PERM:
        k4 = tl.load(perm_row + k4, mask=kw < KWORDS, other=0)
    if EVEN_K:
        words = tl.load(w_rows + kw)
        x = tl.load(x_row + same4 + k4).to(tl.float32)
    else:
        words = tl.load(w_rows + kw, mask=kw < KWORDS, other=0)
        x = tl.load(x_row + same4 + k4, mask=(same4 + kw) < KWORDS, other=0.0).to(tl.float32)
    q = ((words >> (nib * 4)) & 0xF).to(tl.float32)
    qx = tl.sum(tl.sum(q * x, axis=3), axis=2)  # [BN, NG]
    g = ((k0 + gi * WPG) * 8 // GROUP)[None, :]  # [1, NG]: the runs' groups
    g_ok = (k0 + gi * WPG)[None, :] < KWORDS
    if EVEN_K:
        scale = tl.load(s_rows + g).to(tl.float32)
    else:
        scale = tl.load(s_rows + g, mask=g_ok, other=0.0).to(tl.float32)
    xs = tl.sum(tl.sum(x, axis=3), axis=2)
    if HAS_ZEROS:
        zero = tl.load(z_rows + g, mask=g_ok, other=0).to(tl.float32)
    else:
        zero = 8.0
    return scale * (qx - zero * xs)


@triton.jit
def _moe_up_int4_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, z_ptr, act_ptr, perm_ptr, I, KWORDS,
                        stride_xm, stride_we, stride_wn, stride_se, stride_sn, stride_am,
                        TOP_K: tl.constexpr, GROUP: tl.constexpr, HAS_ZEROS: tl.constexpr,
                        WPG: tl.constexpr, NG: tl.constexpr, EVEN_K: tl.constexpr,
                        K_STEPS: tl.constexpr, BLOCK_N: tl.constexpr, HAS_PERM: tl.constexpr,
                        USE_PDL: tl.constexpr):
    """HAS_PERM: ``perm_ptr`` ``[E, H]`` int32, each expert's input order (GPTQ act order)."""
    pdl_start(USE_PDL)
    pid_n, p = tl.program_id(0), tl.program_id(1)
    expert = tl.load(ids_ptr + p).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, I - 1).to(tl.int64)[:, None]  # rows past I read row I-1, never stored
    gate_rows = w_ptr + expert * stride_we + (rn_ld * stride_wn)[:, :, None, None]
    up_rows = gate_rows + I * stride_wn
    gate_s = expert * stride_se + rn_ld * stride_sn
    up_s = gate_s + I * stride_sn
    x_row = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm
    perm_row = perm_ptr + expert * KWORDS * 8
    acc_g = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
    same4 = tl.zeros((BLOCK_N, 1, 1, 1), dtype=tl.int32)
    for s in tl.static_range(K_STEPS):  # unrolled: every load of the program can be in flight
        acc_g += _int4_row_dot(gate_rows, s_ptr + gate_s, z_ptr + gate_s, x_row, same4,
                               s * NG * WPG, KWORDS, GROUP, HAS_ZEROS, WPG, NG, EVEN_K,
                               perm_row, HAS_PERM)
        acc_u += _int4_row_dot(up_rows, s_ptr + up_s, z_ptr + up_s, x_row, same4, s * NG * WPG,
                               KWORDS, GROUP, HAS_ZEROS, WPG, NG, EVEN_K, perm_row, HAS_PERM)
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    silu_mul_store(g, u, act_ptr + p.to(tl.int64) * stride_am, rn, I)


@triton.jit
def _moe_down_int4_kernel(act_ptr, ids_ptr, weights_ptr, w_ptr, s_ptr, z_ptr, out_ptr, H,
                          KWORDS, stride_am, stride_we, stride_wn, stride_se, stride_sn,
                          stride_om, TOP_K: tl.constexpr, GROUP: tl.constexpr,
                          HAS_ZEROS: tl.constexpr, WPG: tl.constexpr, NG: tl.constexpr,
                          EVEN_K: tl.constexpr, K_STEPS: tl.constexpr, BLOCK_N: tl.constexpr,
                          USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    pid_n, t = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, H - 1).to(tl.int64)[:, None]
    dt = out_ptr.dtype.element_ty
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    same4 = tl.zeros((BLOCK_N, 1, 1, 1), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
        rows = w_ptr + expert * stride_we + (rn_ld * stride_wn)[:, :, None, None]
        s_off = expert * stride_se + rn_ld * stride_sn
        a_row = act_ptr + (t * TOP_K + j) * stride_am
        acc = tl.zeros((BLOCK_N, NG), dtype=tl.float32)
        for s in tl.static_range(K_STEPS):
            acc += _int4_row_dot(rows, s_ptr + s_off, z_ptr + s_off, a_row, same4,
                                 s * NG * WPG, KWORDS, GROUP, HAS_ZEROS, WPG, NG, EVEN_K)
        y = tl.sum(acc, axis=1) * tl.load(weights_ptr + t * TOP_K + j)
        out += y.to(dt).to(tl.float32)  # each slot's weighted row rounded, as the grouped path
    tl.store(out_ptr + t * stride_om + rn, out.to(dt), mask=rn < H)


def _tiles(k_dim: int, group: int, interpreted: bool, rows: int) -> dict:
    """``rows`` rows a program, ``NG * WPG`` packed words a row a step: at most 512 / rows, the
    largest power of two dividing the row's words when one is at least 16 (no masked lanes), in
    runs of ``WPG`` words inside one group (a step inside one group where the group's words are
    not a power of two); as many warps as give every thread 4 words (16 bytes) of the tile."""
    kwords, group_words = k_dim // 8, group // 8
    block_kw = min(16 if interpreted else 512 // rows, triton.next_power_of_2(kwords))
    pow2_divisor = kwords & -kwords
    if pow2_divisor >= 16 and not interpreted:
        block_kw = min(block_kw, pow2_divisor)
    # a step inside one group, or whole groups of a power of two words each
    if (group_words % block_kw if group_words >= block_kw
            else group_words & (group_words - 1)):
        block_kw = min(block_kw, group_words & -group_words)
    wpg = min(group_words, block_kw)
    warps = 1 if interpreted else max(1, min(8, rows * block_kw // 128))
    return dict(BLOCK_N=rows, WPG=wpg, NG=block_kw // wpg, K_STEPS=triton.cdiv(kwords, block_kw),
                EVEN_K=kwords % block_kw == 0, GROUP=group, num_warps=warps)


def decode_operands(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                    h: int, inter: int) -> tuple:
    """The packed decode kernels' operands (int4's and ``decode_bnb4.py``'s): ``(hidden,
    weights, ids, act, out)``, hidden and the routing contiguous (weights float32), the
    activations ``[T * k, inter]`` and the output ``[T, h]`` allocated in hidden's dtype."""
    t, k = topk_ids.shape
    hidden = hidden.contiguous()
    act = torch.empty(t * k, inter, dtype=hidden.dtype, device=hidden.device)
    out = torch.empty(t, h, dtype=hidden.dtype, device=hidden.device)
    return hidden, topk_weights.to(torch.float32).contiguous(), topk_ids.contiguous(), act, out


def fused_moe_int4_decode(hidden: torch.Tensor, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                          w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                          w13_zeros: Optional[torch.Tensor] = None,
                          w2_zeros: Optional[torch.Tensor] = None, up_rows: Optional[int] = None,
                          down_rows: Optional[int] = None,
                          w13_perm: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``fused_moe_triton``'s contract on int4 experts (module docstring for the layout) in two
    launches; ``topk_ids`` local expert ids (in range). ``up_rows`` / ``down_rows``: weight
    rows a program of each kernel (default ``INT4_DECODE_ROWS``; benchmarks sweep them).
    ``w13_perm`` ``[E, H]``: GPTQ act order (``reference/moe.py``), x gathered in its order."""
    interp = envs.triton_interpret()
    default = (16, 16) if interp else INT4_DECODE_ROWS  # interpreted: few, large programs
    up_rows, down_rows = up_rows or default[0], down_rows or default[1]
    t, k = topk_ids.shape
    h, inter = w13.shape[2] * 8, w2.shape[2] * 8
    hidden, weights, ids, act, out = decode_operands(hidden, topk_weights, topk_ids, h, inter)
    if t == 0:
        return out
    dev = hidden.device
    w13_scale, w2_scale = w13_scale.contiguous(), w2_scale.contiguous()
    z13 = w13_zeros.contiguous() if w13_zeros is not None else w13_scale
    z2 = w2_zeros.contiguous() if w2_zeros is not None else w2_scale
    perm = ids if w13_perm is None else w13_perm.to(torch.int32).contiguous()
    up = _tiles(h, h // w13_scale.shape[2], interp, up_rows)
    _moe_up_int4_kernel[(triton.cdiv(inter, up["BLOCK_N"]), t * k)](
        hidden, ids, w13, w13_scale, z13, act, perm, inter, h // 8, hidden.stride(0),
        w13.stride(0), w13.stride(1), w13_scale.stride(0), w13_scale.stride(1), act.stride(0),
        TOP_K=k, HAS_ZEROS=w13_zeros is not None, HAS_PERM=w13_perm is not None, **up,
        **pdl_args(dev))
    down = _tiles(inter, inter // w2_scale.shape[2], interp, down_rows)
    _moe_down_int4_kernel[(triton.cdiv(h, down["BLOCK_N"]), t)](
        act, ids, weights, w2, w2_scale, z2, out, h, inter // 8, act.stride(0), w2.stride(0),
        w2.stride(1), w2_scale.stride(0), w2_scale.stride(1), out.stride(0), TOP_K=k,
        HAS_ZEROS=w2_zeros is not None, **down, **pdl_args(dev))
    return out
