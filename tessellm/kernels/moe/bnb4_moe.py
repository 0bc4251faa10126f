"""``fused_moe_triton`` on bitsandbytes 4-bit experts (keyword ``bnb4_code``): which path runs.

    tokens <= bnb4_decode_max_tokens(), SiLU, no biases, no tiles
        -> decode_bnb4.fused_moe_bnb4_decode: two launches reading the packed codes
    otherwise
        -> fused_moe._fused_moe_dequant: the routed experts dequantized a chunk at a time
           (bnb4_dequant.py, one launch a chunk and weight), then the 16-bit grouped GEMMs

Expert parallelism (``expert_map``): as ``fused_moe_triton`` does it: the decode kernels send
other ranks' pairs to local expert 0 with weight 0, the grouped GEMMs give them no row.
"""

from __future__ import annotations

from typing import Optional

import torch

from tessellm.kernels.moe.bnb4_dequant import dequantize_bnb4_experts
from tessellm.kernels.moe.decode_bnb4 import bnb4_decode_max_tokens, fused_moe_bnb4_decode
from tessellm.kernels.moe.fused_moe import _fused_moe_dequant


def fused_moe_bnb4(hidden: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                   w13: torch.Tensor, w2: torch.Tensor, w13_absmax: torch.Tensor,
                   w2_absmax: torch.Tensor, code: torch.Tensor, tiles: Optional[dict] = None, *,
                   activation=None, w13_bias=None, w2_bias=None,
                   expert_map: Optional[torch.Tensor] = None, others: dict) -> torch.Tensor:
    """The contract's product on bnb4 experts (``reference/moe.py``); ``others``: the variant
    keywords that do not combine with ``bnb4_code`` (each must be unset). ``tiles`` (the
    grouped GEMMs' launch parameters of the other variants) only turns the decode path off."""
    given = [name for name, value in others.items() if value is not None and value is not False]
    if given:
        raise ValueError(f"fused_moe: bnb4_code (bitsandbytes 4-bit experts) does not combine "
                         f"with {', '.join(given)}; pass the bnb4 codes and absmaxes alone.")
    if (w13_absmax is None or w2_absmax is None or w13.dtype != torch.uint8
            or w2.dtype != torch.uint8 or code.numel() != 16
            or w13_absmax.shape[:2] != w13.shape[:2] or w2_absmax.shape[:2] != w2.shape[:2]):
        raise ValueError("fused_moe: bnb4_code (the 16-entry NF4 / FP4 table) needs uint8 w13 / "
                         "w2 codes [E, N, K/2] and their float32 absmaxes [E, N, K/bs] as "
                         "w13_scale / w2_scale.")
    for name, w, absmax in (("w13", w13, w13_absmax), ("w2", w2, w2_absmax)):
        k, blocks = w.shape[2] * 2, absmax.shape[2]
        bs = k // max(1, blocks)
        if blocks == 0 or k != bs * blocks or bs < 2 or bs & (bs - 1):
            raise ValueError(f"fused_moe: {name}'s bnb4 rows of {k} inputs with {blocks} absmaxes "
                             "are not whole blocks of a power-of-two size (bitsandbytes' "
                             "blocksizes, 64 in released models); dequantize such experts and "
                             "pass them dense.")
    t = topk_ids.shape[0]
    num_experts = w13.shape[0]
    if activation is not None and activation.kind == "silu":
        activation = None
    plain = activation is None and w13_bias is None and w2_bias is None
    if expert_map is not None:
        local = expert_map[topk_ids.long()]
        held = local >= 0
    if tiles is None and plain and 0 < t <= bnb4_decode_max_tokens():
        if expert_map is not None:
            topk_weights = torch.where(held, topk_weights.float(), 0.0)
            topk_ids = torch.where(held, local, 0)
        return fused_moe_bnb4_decode(hidden, topk_weights, topk_ids, w13, w2, w13_absmax,
                                     w2_absmax, code)
    if expert_map is not None:
        topk_ids = torch.where(held, local, num_experts)
    dtype = hidden.dtype

    def dequant13(lo, hi, hit):
        return dequantize_bnb4_experts(w13, w13_absmax, code, dtype, lo, hi, hit)

    def dequant2(lo, hi, hit):
        return dequantize_bnb4_experts(w2, w2_absmax, code, dtype, lo, hi, hit)

    return _fused_moe_dequant(hidden, topk_weights, topk_ids, w13, w2, 2, dequant13, dequant2,
                              None, activation, w13_bias, w2_bias, expert_map is not None,
                              num_experts if expert_map is None else expert_map.shape[0])
