"""Fused MoE for decode (a few tokens): two GEMV-style launches, no alignment, no sum kernel.

At 1 token (B1) a Qwen3-30B-A3B layer reads 8 experts x 3 x 2048 x 768 bf16 = 75.5 MB: 17.8 us
at 4.25 TB/s. The grouped GEMM path (``fused_moe.py``) spends 6 launches on it (routing, two of
alignment, two GEMMs over 16-row blocks of which one row is used, the top-k sum). Here each
(token, slot) pair reads its expert's rows directly from ``topk_ids``::

    routing (routing.py, 1 launch) -> weights, ids [T, k]
    _moe_up_kernel    grid (I / BLOCK_N, T * k):   program (n, p) reads rows n-block of the
        gate and of the up half of w13[ids[p]] over all of H, multiplies by hidden[p // k]
        -> act[p, n-block] = silu(gate) * up            (the reference's rounding points)
    _moe_down_kernel  grid (H / BLOCK_N, T):       program (n, t) loops over the k slots of
        token t: y_j = w2[ids[t, j]][n-block] @ act[t * k + j], rounded as weights[t, j] * y_j
        in hidden's dtype, summed in float32 -> out[t, n-block]     (no atomics: deterministic)

Each program reads whole weight rows, 16 bytes a thread per load (as many warps as that
takes), all of its loads unrolled so that they can be in flight together, FMAs in float32 (no
tensor cores: one row of x), like ``kernels/gemm/gemv.py``'s FMA kernel; the grids (768 x 8
and 1,024 programs at one token with the default 1- and 2-row tiles) give every SM of an H200
many programs. ``fused_moe_decode_routed`` also moves the routing into the up kernel (off by
default: slower as measured, see ``DECODE_ROUTE``).
Tokens that share an expert read it again (from the L2 when lucky), so the grouped path wins
past a few tokens (``DECODE_MAX_TOKENS``). fp8 experts (e4m3 with per-output-channel float32
scales) are widened in the tile and the row sums scaled (W8A16).
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.moe.routing import check_routing, topk_scores
from tessellm.kernels.pdl import pdl_args, pdl_start

# Up to this many tokens ``fused_moe`` takes this path (``TESSELLM_MOE_DECODE_MAX_TOKENS``
# overrides; 0 turns it off), with these weight rows a program in its two kernels
# (``TESSELLM_MOE_DECODE_ROWS``). H200, Qwen3-30B-A3B layer, routing included, PDL, L2 flushed
# (benchmarks/results/h200-2026-12-04-wave2c/moe_layer.json): 33.7 / 48.7 / 82.8 / 146.2 us at
# 1 / 2 / 4 / 8 tokens against the grouped path's 37.3 / 55.4 / 89.9 / 126.1; the rows sweep at
# 1 token was flat (31.0-32.5 us for up/down rows 1-8 / 2-4), 1 / 2 the fastest.
DECODE_MAX_TOKENS = 4
DECODE_ROWS = (1, 2)
# The contract entry can route inside the up kernel (``fused_moe_decode_routed``: two launches
# instead of three; ``TESSELLM_MOE_DECODE_ROUTE=1``). Off: with the 1-row up tiles every one of
# the 6,144 programs ranks the 128 logits, 44.2 us against 33.7 at 1 token (same file).
DECODE_ROUTE = False


def decode_route() -> bool:
    value = envs.moe_decode_route()
    return DECODE_ROUTE if value is None else value


def decode_max_tokens() -> int:
    value = envs.moe_decode_max_tokens()
    return DECODE_MAX_TOKENS if value is None else value


@triton.jit
def _row_dot(w_rows, x_row, same, koff, K, EVEN_K: tl.constexpr):
    """Float32 products of a ``[BN, BK]`` weight tile with x at K offsets ``koff`` ([1, BK]);
    x is loaded in the tile's shape (``same``: [BN, 1] zeros, every row at the same addresses)
    so that it takes the tile's register layout instead of a shuffle through shared memory."""
    if EVEN_K:
        w = tl.load(w_rows + koff)
        x = tl.load(x_row + same + koff)
    else:
        ok = (same + koff) < K
        w = tl.load(w_rows + koff, mask=ok, other=0.0)
        x = tl.load(x_row + same + koff, mask=ok, other=0.0)
    return w.to(tl.float32) * x.to(tl.float32)


@triton.jit
def silu_mul_store(g, u, act_row, rn, I):
    """The up kernels' epilogue: ``silu(g) * u`` into ``act_row[rn]`` (rows below ``I``), at
    the reference's rounding points (gate / up, SiLU, product in the activation dtype)."""
    dt = act_row.dtype.element_ty
    g = g.to(dt).to(tl.float32)
    a = (g / (1.0 + tl.exp(-g))).to(dt).to(tl.float32) * u.to(dt).to(tl.float32)
    tl.store(act_row + rn, a.to(dt), mask=rn < I)


@triton.jit
def _moe_up_kernel(x_ptr, ids_ptr, w_ptr, s_ptr, act_ptr, logits_ptr, weights_ptr, I, H, E,
                   stride_xm, stride_we, stride_wn, stride_se, stride_am, stride_l,
                   TOP_K: tl.constexpr, HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr,
                   K_STEPS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ROUTE: tl.constexpr, K_P2: tl.constexpr, BLOCK_E: tl.constexpr,
                   SIGMOID: tl.constexpr, RENORMALIZE: tl.constexpr, USE_PDL: tl.constexpr):
    """ROUTE: every program routes its token from the logits (``routing.topk_scores``) and
    takes its slot's expert; the first column block writes the slot's weight and id for the
    down kernel. Else the ids come from ``ids_ptr``."""
    pdl_start(USE_PDL)
    pid_n, p = tl.program_id(0), tl.program_id(1)
    if ROUTE:
        top_w, top_i = topk_scores(logits_ptr + (p // TOP_K).to(tl.int64) * stride_l, E, TOP_K,
                                   K_P2, BLOCK_E, SIGMOID, RENORMALIZE)
        mine = tl.arange(0, K_P2) == p % TOP_K
        expert32 = tl.sum(tl.where(mine, top_i, 0), 0)
        if pid_n == 0:
            tl.store(ids_ptr + p, expert32)
            tl.store(weights_ptr + p, tl.sum(tl.where(mine, top_w, 0.0), 0))
        expert = expert32.to(tl.int64)
    else:
        expert = tl.load(ids_ptr + p).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, I - 1)  # rows past I read row I-1 again, never stored
    gate_rows = w_ptr + expert * stride_we + rn_ld.to(tl.int64)[:, None] * stride_wn
    up_rows = gate_rows + I * stride_wn
    x_row = x_ptr + (p // TOP_K).to(tl.int64) * stride_xm
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    same = tl.zeros((BLOCK_N, 1), dtype=tl.int32)
    for s in tl.static_range(K_STEPS):  # unrolled: every load of the program can be in flight
        koff = s * BLOCK_K + tl.arange(0, BLOCK_K)[None, :]
        acc_g += _row_dot(gate_rows, x_row, same, koff, H, EVEN_K)
        acc_u += _row_dot(up_rows, x_row, same, koff, H, EVEN_K)
    g = tl.sum(acc_g, axis=1)
    u = tl.sum(acc_u, axis=1)
    if HAS_SCALE:
        g *= tl.load(s_ptr + expert * stride_se + rn_ld)
        u *= tl.load(s_ptr + expert * stride_se + I + rn_ld)
    silu_mul_store(g, u, act_ptr + p.to(tl.int64) * stride_am, rn, I)


@triton.jit
def _moe_down_kernel(act_ptr, ids_ptr, weights_ptr, w_ptr, s_ptr, out_ptr, H, I, stride_am,
                     stride_we, stride_wn, stride_se, stride_om, TOP_K: tl.constexpr,
                     HAS_SCALE: tl.constexpr, EVEN_K: tl.constexpr, K_STEPS: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr):
    pdl_start(USE_PDL)
    pid_n, t = tl.program_id(0), tl.program_id(1).to(tl.int64)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rn_ld = tl.minimum(rn, H - 1)
    dt = out_ptr.dtype.element_ty
    out = tl.zeros((BLOCK_N,), dtype=tl.float32)
    same = tl.zeros((BLOCK_N, 1), dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        expert = tl.load(ids_ptr + t * TOP_K + j).to(tl.int64)
        rows = w_ptr + expert * stride_we + rn_ld.to(tl.int64)[:, None] * stride_wn
        a_row = act_ptr + (t * TOP_K + j) * stride_am
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
        for s in tl.static_range(K_STEPS):
            acc += _row_dot(rows, a_row, same, s * BLOCK_K + tl.arange(0, BLOCK_K)[None, :], I,
                            EVEN_K)
        y = tl.sum(acc, axis=1)
        if HAS_SCALE:
            y *= tl.load(s_ptr + expert * stride_se + rn_ld)
        y *= tl.load(weights_ptr + t * TOP_K + j)
        out += y.to(dt).to(tl.float32)  # each slot's weighted row rounded, as the grouped path
    tl.store(out_ptr + t * stride_om + rn, out.to(dt), mask=rn < H)


def _tiles(k_dim: int, interpreted: bool, rows: int) -> dict:
    """``rows`` rows a program, ``BLOCK_K`` columns a step (at most 1024 / rows, the largest
    power of two dividing ``k_dim`` when one is at least 64: no masked lanes), as many warps as
    give every thread 8 elements (16 bytes in bf16) of the ``[rows, BLOCK_K]`` tile a load."""
    if interpreted:
        block_k = min(32, triton.next_power_of_2(k_dim))
        return dict(BLOCK_N=rows, BLOCK_K=block_k, K_STEPS=triton.cdiv(k_dim, block_k),
                    num_warps=1)
    block_k = min(1024 // rows, triton.next_power_of_2(k_dim))
    pow2_divisor = k_dim & -k_dim
    if pow2_divisor >= 64:
        block_k = min(block_k, pow2_divisor)
    warps = max(1, min(8, rows * block_k // 256))
    return dict(BLOCK_N=rows, BLOCK_K=block_k, K_STEPS=triton.cdiv(k_dim, block_k),
                num_warps=warps)


def fused_moe_decode(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                     w13: torch.Tensor, w2: torch.Tensor, w13_scale: Optional[torch.Tensor] = None,
                     w2_scale: Optional[torch.Tensor] = None, up_rows: Optional[int] = None,
                     down_rows: Optional[int] = None) -> torch.Tensor:
    """``fused_moe_triton``'s contract (module docstring for the layout) in two launches;
    ``up_rows`` / ``down_rows``: weight rows a program of each kernel (default
    ``DECODE_ROWS`` or ``TESSELLM_MOE_DECODE_ROWS``; benchmarks sweep them)."""
    weights = topk_weights.to(torch.float32).contiguous()
    return _launch(hidden, weights, topk_ids.contiguous(), None, w13, w2, w13_scale, w2_scale,
                   (up_rows, down_rows))


def fused_moe_decode_routed(hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
                            renormalize: bool = True, w13_scale=None, w2_scale=None,
                            up_rows: Optional[int] = None,
                            down_rows: Optional[int] = None) -> torch.Tensor:
    """The contract's ``fused_moe`` (routing included) in two launches: the up kernel routes
    (each program its own token's top k; ``routing.py``'s semantics) and keeps the weights and
    ids for the down kernel."""
    logits = check_routing(router_logits, top_k, scoring)
    t = logits.shape[0]
    weights = torch.empty(t, top_k, dtype=torch.float32, device=hidden.device)
    ids = torch.empty(t, top_k, dtype=torch.int32, device=hidden.device)
    route = dict(logits=logits, sigmoid=scoring == "sigmoid", renormalize=renormalize)
    return _launch(hidden, weights, ids, route, w13, w2, w13_scale, w2_scale, (up_rows, down_rows))


def _launch(hidden, weights, ids, route, w13, w2, w13_scale, w2_scale, rows) -> torch.Tensor:
    default = envs.moe_decode_rows() or DECODE_ROWS
    up_rows, down_rows = rows[0] or default[0], rows[1] or default[1]
    t, k = ids.shape
    num_experts, inter, h = w13.shape[0], w2.shape[2], w13.shape[2]
    hidden = hidden.contiguous()
    dev, dtype = hidden.device, hidden.dtype
    out = torch.empty(t, h, dtype=dtype, device=dev)
    if t == 0:
        return out
    interp = envs.triton_interpret()
    act = torch.empty(t * k, inter, dtype=dtype, device=dev)
    up = _tiles(h, interp, up_rows)
    logits = route["logits"] if route else hidden
    _moe_up_kernel[(triton.cdiv(inter, up["BLOCK_N"]), t * k)](
        hidden, ids, w13, w13_scale if w13_scale is not None else w13, act, logits, weights,
        inter, h, num_experts, hidden.stride(0), w13.stride(0), w13.stride(1),
        w13_scale.stride(0) if w13_scale is not None else 0, act.stride(0), logits.stride(0),
        TOP_K=k, HAS_SCALE=w13_scale is not None, EVEN_K=h % up["BLOCK_K"] == 0, **up,
        ROUTE=route is not None, K_P2=triton.next_power_of_2(k),
        BLOCK_E=triton.next_power_of_2(num_experts), SIGMOID=bool(route and route["sigmoid"]),
        RENORMALIZE=bool(route and route["renormalize"]), **pdl_args(dev))
    down = _tiles(inter, interp, down_rows)
    _moe_down_kernel[(triton.cdiv(h, down["BLOCK_N"]), t)](
        act, ids, weights, w2, w2_scale if w2_scale is not None else w2, out, h, inter,
        act.stride(0), w2.stride(0), w2.stride(1),
        w2_scale.stride(0) if w2_scale is not None else 0, out.stride(0), TOP_K=k,
        HAS_SCALE=w2_scale is not None, EVEN_K=inter % down["BLOCK_K"] == 0, **down,
        **pdl_args(dev))
    return out
