"""The cpu backend's MoE: tokens grouped by expert with one sort, one product per touched expert.

Same arithmetic as the reference loop (``reference/moe.py``) but without a mask pass per expert:
the (token, slot) pairs are sorted by expert once, each touched expert multiplies one
contiguous slice, and the weighted rows are scattered back with one ``index_add_``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tessellm.backends.reference.moe import SILU, dequantize_experts, local_expert_ids, route


def fused_moe_grouped(hidden, router_logits, w13, w2, top_k: int, scoring: str = "softmax",
                      renormalize: bool = True, w13_scale=None, w2_scale=None, *,
                      activation=SILU, w13_bias=None, w2_bias=None,
                      block_shape=None, expert_map=None, **int4) -> torch.Tensor:
    """``FusedOps.fused_moe`` with the reference's variants (``reference/moe.py``: an
    ``ExpertActivation``, per-expert biases, block-wise fp8 scales, an ``expert_map``, int4
    experts: ``int4``, ``w13_zeros``, ``w2_zeros``, ``w13_perm``; bnb4 experts: ``bnb4_code``)."""
    weights, ids = route(router_logits, top_k, scoring, renormalize)
    return grouped_experts(hidden, weights, ids, w13, w2, w13_scale, w2_scale,
                           activation=activation, w13_bias=w13_bias, w2_bias=w2_bias,
                           block_shape=block_shape, expert_map=expert_map, **int4)


def grouped_experts(hidden, topk_weights, topk_ids, w13, w2, w13_scale=None, w2_scale=None, *,
                    activation=SILU, w13_bias=None, w2_bias=None,
                    block_shape=None, expert_map=None, int4=False, w13_zeros=None,
                    w2_zeros=None, w13_perm=None, bnb4_code=None) -> torch.Tensor:
    """``FusedOps.fused_experts``: the grouped product with the routing given (``[T, k]``).
    fp8 experts (per channel, or per block with ``block_shape``), int4 experts (``int4``:
    AWQ / GPTQ codes with group scales and ``*_zeros``, GPTQ act order's ``w13_perm``) and
    bitsandbytes 4-bit experts (``bnb4_code``: codes with block absmaxes as the scales) are
    dequantized one touched expert at a time (W8A16 / W4A16): the weights stay quantized in
    memory. ``expert_map`` (global id -> local id or -1): pairs of experts held elsewhere sort
    first, as -1, and are skipped."""
    weights, ids = topk_weights, local_expert_ids(topk_ids, expert_map)
    top_k = ids.shape[1]
    dtype = hidden.dtype
    flat = ids.flatten()
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat + 1, minlength=w13.shape[0] + 1).tolist()
    skipped = counts.pop(0)  # pairs of experts held by other ranks (-1): sorted first
    order = order[skipped:]
    token_of = order // top_k
    x = hidden[token_of]
    pieces, start = [], 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        up13 = dequantize_experts(w13[e], None if w13_scale is None else w13_scale[e], dtype,
                                  block_shape, None if w13_zeros is None else w13_zeros[e], int4,
                                  bnb4_code)
        down = dequantize_experts(w2[e], None if w2_scale is None else w2_scale[e], dtype,
                                  block_shape, None if w2_zeros is None else w2_zeros[e], int4,
                                  bnb4_code)
        xe = x[start:start + n]
        if w13_perm is not None:  # GPTQ act-order int4 experts: inputs in w13's stored order
            xe = xe[:, w13_perm[e].long()]
        gate_up = F.linear(xe, up13, None if w13_bias is None else w13_bias[e])
        pieces.append(F.linear(activation(gate_up), down, None if w2_bias is None else w2_bias[e]))
        start += n
    out = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device)
    if not pieces:  # no pair of this rank's experts
        return out.to(dtype)
    y = torch.cat(pieces) * weights.flatten()[order, None].to(dtype)
    out.index_add_(0, token_of, y.float())
    return out.to(dtype)
