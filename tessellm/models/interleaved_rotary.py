"""Rotary on interleaved pairs (GPT-J style: ``(x[2i], x[2i+1])``, Cohere, GPT-J) served by the
backends' NeoX rotary (which rotates ``(x[i], x[i + d/2])``): each head's first ``rotary_dim``
dims of q and k are reordered evens then odds before rotary. q.k is the same under one
reordering of both, and v is left alone::

    head dims  [ 0 1 2 3 4 5 | 6 7 ]  ->  [ 0 2 4 | 1 3 5 | 6 7 ]     (rotary_dim 6)

Done on the projected q and k (not on the checkpoint's rows) so quantized layers and LoRA
adapters see the checkpoint's own layout.
"""

from __future__ import annotations

import torch

from tessellm.models.decoder import DecoderAttention


def evens_then_odds(x: torch.Tensor, head_size: int, rotary_dim: int) -> torch.Tensor:
    """``x``: ``[T, heads * head_size]``; each head's first ``rotary_dim`` dims reordered."""
    t = x.shape[0]
    heads = x.view(t, -1, head_size)
    rot = heads[..., :rotary_dim].unflatten(-1, (rotary_dim // 2, 2)).transpose(-1, -2)
    if rotary_dim == head_size:
        return rot.reshape(t, x.shape[1])
    return torch.cat((rot.flatten(-2), heads[..., rotary_dim:]), dim=-1).view(t, x.shape[1])


class InterleavedRotaryAttention(DecoderAttention):
    """``DecoderAttention`` whose rotary takes interleaved pairs (GLM, ERNIE 4.5): q and k are
    reordered after the projection (and q/k norms), before the NeoX rotary."""

    def norm_qk(self, q, k):
        q, k = super().norm_qk(q, k)
        d, r = self.head_size, self.rotary.rotary_dim
        return evens_then_odds(q, d, r), evens_then_odds(k, d, r)
