"""Checkpoints that fuse q, k and v into one tensor with the heads interleaved (GPT-NeoX's
``query_key_value``, GPT-BigCode's ``c_attn`` without multi-query): cut into q, k and v so
they load as separate ``q_proj`` / ``k_proj`` / ``v_proj`` tensors would (each tensor-parallel
rank then takes its own heads' rows of each)::

    rows  [ q0 k0 v0 | q1 k1 v1 | ... ]  (head_size rows each)  ->  [ q0 q1 .. ], [ k.. ], [ v.. ]
"""

from __future__ import annotations

import torch

from tessellm.layers.linear import materialize
from tessellm.quantization.bnb_stored import StoredBnb


def split_per_head(tensor, heads: int, head_size: int) -> tuple[torch.Tensor, ...]:
    """``tensor``: ``[heads * 3 * head_size, ...]`` (a weight or a bias); returns q, k, v."""
    return rows_of_fused(tensor, lambda rows: tuple(
        rows.unflatten(0, (heads, 3, head_size))[:, i].flatten(0, 1) for i in range(3)))


def rows_of_fused(tensor, cut) -> tuple:
    """``cut(rows)`` (views of ``rows`` by its first dimension: q, k, v) applied to ``tensor``;
    a quantized weight that cannot be viewed (bitsandbytes, ``bnb_stored.StoredBnb``) takes
    the rows ``cut`` picks from its row numbers instead."""
    if isinstance(tensor, StoredBnb):
        return tuple(tensor.take_rows(part) for part in cut(torch.arange(tensor.shape[0])))
    return cut(materialize(tensor))
