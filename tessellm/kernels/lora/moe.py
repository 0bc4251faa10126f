"""MoE experts with per-token LoRA adapters on Triton: ``LoRAOps.fused_experts_lora``.

The fused MoE's grouped GEMMs (``kernels/moe/fused_moe.py``) run the base experts unfused, and
two grouped LoRA kernels add each routed pair's adapter to both products, before the
activation and before the routing weight (``backends/reference/moe_lora.py`` is the oracle)::

    ids [T, k] --align by expert--> GEMM 1 (w13[e]) --> C1 [T*k, 2I]
    (slot, expert) of each pair --align by group g = s*E + e (pairs without an adapter: none)-->
        shrink: buf13[p] = A13[g] x[p // k]           [T*k, n*R] float32
        expand: C1[p, part i] += sc[s] * B13_i[g] buf13[p, i*R:(i+1)*R]
    act(C1) --> A2 [T*k, I] --> GEMM 2 (w2[e]) --> C2 [T*k, H];  the same shrink/expand with
        A2 / w2_a / w2_b;  C2 *= routing weight;  out[t] = sum of its k rows (float32)

Grouping by (slot, expert) is the fused MoE's own alignment (``align_by_expert_triton`` with
``S * E`` groups), so each LoRA program multiplies ``BLOCK_M`` pairs of one adapter and one
expert by that pair of matrices (SGMV-style); no host synchronisation anywhere (graph
capturable). Cost over the base MoE: the unfused first GEMM, two alignments and four small
LoRA launches per layer.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs
from tessellm.kernels.moe.align import align_by_expert_triton
from tessellm.kernels.moe.fused_moe import _expert_gemm, _silu_and_mul, _sum_topk, _tiles


@triton.jit
def _moe_lora_shrink_kernel(x_ptr, a_ptr, out_ptr, sorted_ids_ptr, block_group_ptr,
                            num_padded_ptr, num_pairs, num_groups, K, RN, stride_xm, stride_ag,
                            stride_ar, stride_om, A_ROW_DIV: tl.constexpr, BLOCK_M: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, DOT_PREC: tl.constexpr,
                            DOT_FP32: tl.constexpr):
    """out[p, r] = sum_k x[p // A_ROW_DIV, k] * a[g, r, k] (float32) for the pairs p of each
    block, g the block's group; pairs in no group get no row (and keep out's old value)."""
    pid_m, pid_r = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    g = tl.load(block_group_ptr + pid_m).to(tl.int64)
    if g >= num_groups:
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = pairs < num_pairs
    rr = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    x_row = x_ptr + (pairs // A_ROW_DIV).to(tl.int64)[:, None] * stride_xm
    a_col = a_ptr + g * stride_ag + rr[None, :].to(tl.int64) * stride_ar
    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_row + rk[None, :], mask=ok[:, None] & (rk[None, :] < K), other=0.0)
        a = tl.load(a_col + rk[:, None], mask=(rk[:, None] < K) & (rr[None, :] < RN), other=0.0)
        if DOT_FP32:  # float32, or bf16 under the interpreter (no bf16 arithmetic there)
            x = x.to(tl.float32)
        acc += tl.dot(x, a.to(x.dtype), input_precision=DOT_PREC)
    o = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + rr[None, :]
    tl.store(o, acc, mask=ok[:, None] & (rr[None, :] < RN))


@triton.jit
def _moe_lora_expand_kernel(buf_ptr, b_ptr, scaling_ptr, out_ptr, sorted_ids_ptr,
                            block_group_ptr, num_padded_ptr, num_pairs, num_groups, experts, N,
                            R, part_rows, stride_bm, stride_bg, stride_bn, stride_om,
                            PARTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_R: tl.constexpr, DOT_PREC: tl.constexpr,
                            DOT_FP32: tl.constexpr):
    """out[p, n] += scaling[g // experts] * sum_r b[g, n, r] * buf[p, i * R + r], i = n //
    part_rows (the part of column n); float32 sum, rounded once into out's dtype."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    g = tl.load(block_group_ptr + pid_m).to(tl.int64)
    if g >= num_groups:
        return
    scale = tl.load(scaling_ptr + g // experts)
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    ok = pairs < num_pairs
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    buf_row = buf_ptr + pairs.to(tl.int64)[:, None] * stride_bm
    b_col = b_ptr + g * stride_bg + rn[None, :].to(tl.int64) * stride_bn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in tl.static_range(PARTS):
        cols = (rn >= i * part_rows) & (rn < (i + 1) * part_rows) & (rn < N)
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            v = tl.load(buf_row + i * R + rr[None, :], mask=ok[:, None] & (rr[None, :] < R),
                        other=0.0)
            w = tl.load(b_col + rr[:, None], mask=(rr[:, None] < R) & cols[None, :], other=0.0)
            if DOT_FP32:
                acc += tl.dot(v, w.to(tl.float32), input_precision=DOT_PREC)
            else:
                acc += tl.dot(v.to(w.dtype), w, input_precision=DOT_PREC)
    mask = ok[:, None] & (rn[None, :] < N)
    o = out_ptr + pairs.to(tl.int64)[:, None] * stride_om + rn[None, :]
    y = tl.load(o, mask=mask, other=0.0).to(tl.float32) + scale * acc
    tl.store(o, y.to(out_ptr.dtype.element_ty), mask=mask)


def _lora_tiles() -> dict:
    if envs.triton_interpret():
        return dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32)
    return dict(BLOCK_M=16, BLOCK_N=64, BLOCK_K=64)


def _add_pair_lora(x, a, b, scaling, out, align, row_div: int, experts: int, tiles: dict) -> None:
    """``out[p] += sc * B (A x[p // row_div])`` per part for the pairs ``align`` groups (module
    docstring); ``a [G, n*R, K]``, ``b [G, N, R]`` (G = slots * experts, contiguous)."""
    sorted_ids, block_group, num_padded = align
    groups, rn, k = a.shape
    n, r = b.shape[1], b.shape[2]
    pairs = out.shape[0]
    fp32 = x.dtype == torch.float32
    interp_bf16 = x.device.type == "cpu" and x.dtype == torch.bfloat16
    bm = tiles["BLOCK_M"]
    blocks = sorted_ids.numel() // bm
    buf = torch.empty(pairs, rn, dtype=torch.float32, device=x.device)
    block_r = min(64, max(16, triton.next_power_of_2(rn)))
    _moe_lora_shrink_kernel[(blocks, triton.cdiv(rn, block_r))](
        x, a, buf, sorted_ids, block_group, num_padded, pairs, groups, k, rn, x.stride(0),
        a.stride(0), a.stride(1), buf.stride(0), A_ROW_DIV=row_div, BLOCK_M=bm,
        BLOCK_R=block_r, BLOCK_K=tiles["BLOCK_K"], DOT_PREC="ieee" if fp32 else "tf32",
        DOT_FP32=fp32 or interp_bf16)
    wide = b.dtype == torch.float32
    _moe_lora_expand_kernel[(blocks, triton.cdiv(n, tiles["BLOCK_N"]))](
        buf, b, scaling, out, sorted_ids, block_group, num_padded, pairs, groups, experts, n, r,
        n // (rn // r), buf.stride(0), b.stride(0), b.stride(1), out.stride(0),
        PARTS=rn // r, BLOCK_M=bm, BLOCK_N=tiles["BLOCK_N"],
        BLOCK_R=min(64, max(16, triton.next_power_of_2(r))),
        DOT_PREC="ieee" if wide else "tf32",
        DOT_FP32=wide or (b.dtype == torch.bfloat16 and b.device.type == "cpu"))


def fused_experts_lora_triton(hidden: torch.Tensor, topk_weights: torch.Tensor,
                              topk_ids: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                              token_slots: torch.Tensor, lora, *, activation=None,
                              w13_bias: Optional[torch.Tensor] = None,
                              w2_bias: Optional[torch.Tensor] = None,
                              expert_map: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``LoRAOps.fused_experts_lora`` (module docstring; layouts: ``ExpertLoRA`` in
    backends/spec.py). Unquantized experts in hidden's dtype."""
    t, k = topk_ids.shape
    if activation is not None and activation.kind == "silu":
        activation = None
    num_experts, inter = w13.shape[0], w2.shape[2]
    num_slots = lora.w13_a.shape[0]
    local = topk_ids.long() if expert_map is None else expert_map.long()[topk_ids.long()]
    held = local >= 0
    base_ids = torch.where(held, local, num_experts).to(torch.int32)
    # by the pairs per global expert with expert parallelism (``fused_moe._grouped_tiles``)
    tiles = _tiles(t * k, num_experts if expert_map is None else expert_map.shape[0],
                   hidden.device, hidden.element_size())
    tiles.pop("SILU_MUL", None)
    hidden = hidden.contiguous()
    dev, dtype = hidden.device, hidden.dtype
    align = align_by_expert_triton(base_ids, num_experts, tiles["BLOCK_M"])
    slots = token_slots.long()[:, None].expand(t, k)
    groups = num_slots * num_experts
    group_ids = torch.where(held & (slots >= 0), slots * num_experts + local, groups)
    lora_tiles = _lora_tiles()
    lora_align = align_by_expert_triton(group_ids.to(torch.int32), groups, lora_tiles["BLOCK_M"])
    flat = (lambda w: w.reshape(groups, *w.shape[2:]))  # [S, E, ...] -> [S*E, ...]

    c1 = torch.empty(t * k, w13.shape[1], dtype=dtype, device=dev)
    _expert_gemm(hidden, w13, None, None, *align, c1, k, tiles, bias=w13_bias)
    _add_pair_lora(hidden, flat(lora.w13_a), flat(lora.w13_b), lora.scaling, c1, lora_align, k,
                   num_experts, lora_tiles)
    act = _silu_and_mul(c1, inter) if activation is None else activation(c1)
    c2 = (torch.empty if expert_map is None else torch.zeros)(t * k, w2.shape[1], dtype=dtype,
                                                              device=dev)
    _expert_gemm(act, w2, None, None, *align, c2, 1, tiles, bias=w2_bias)
    _add_pair_lora(act, flat(lora.w2_a), flat(lora.w2_b), lora.scaling, c2, lora_align, 1,
                   num_experts, lora_tiles)
    c2 = c2 * topk_weights.reshape(-1, 1).to(dtype)
    return _sum_topk(c2, t, k, dtype)
