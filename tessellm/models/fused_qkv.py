"""Checkpoints that fuse q, k and v into one tensor with the heads interleaved (GPT-NeoX's
``query_key_value``, GPT-BigCode's ``c_attn`` without multi-query): cut into q, k and v so
they load as separate ``q_proj`` / ``k_proj`` / ``v_proj`` tensors would (each tensor-parallel
rank then takes its own heads' rows of each)::

    rows  [ q0 k0 v0 | q1 k1 v1 | ... ]  (head_size rows each)  ->  [ q0 q1 .. ], [ k.. ], [ v.. ]
"""

from __future__ import annotations

import torch

from tessellm.layers.linear import materialize


def split_per_head(tensor, heads: int, head_size: int) -> tuple[torch.Tensor, ...]:
    """``tensor``: ``[heads * 3 * head_size, ...]`` (a weight or a bias); returns q, k, v."""
    per_head = materialize(tensor).unflatten(0, (heads, 3, head_size))
    return tuple(per_head[:, i].flatten(0, 1) for i in range(3))
