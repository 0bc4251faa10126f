"""``torch``'s scaled-dot-product attention, or its explicit form where the scores are
soft-capped (``AttentionSpec.logit_softcap``, Gemma 2): SDPA has no hook between the scaled
product and the softmax, so a capped layer runs the product, ``cap * tanh(s / cap)``, the mask
and the softmax itself, in float32. So does a layer with attention sinks
(``AttentionSpec.attention_sinks``, gpt-oss): SDPA's softmax has no extra denominator term.
Layers with neither take SDPA exactly as before.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from tessellm.backends.reference.attention import softcap, softmax_with_sinks


def sdpa(q, k, v, attn_mask=None, is_causal: bool = False, scale: Optional[float] = None,
         logit_softcap: Optional[float] = None,
         sinks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.scaled_dot_product_attention(q, k, v, attn_mask, is_causal=..., scale=...)`` with the
    scores soft-capped when ``logit_softcap`` is set, and ``sinks`` (broadcastable to
    ``[..., Q, 1]``: each query row's head's sink logit) in the softmax denominator when given.
    ``attn_mask``: bool (True: attend) or additive float, broadcastable to ``[..., Q, L]``. A
    row that sees no key gives 0."""
    if logit_softcap is None and sinks is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal,
                                              scale=scale)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = softcap(q.float() @ k.float().transpose(-2, -1) * scale, logit_softcap)
    if is_causal:
        n, m = scores.shape[-2:]
        attn_mask = torch.ones(n, m, dtype=torch.bool, device=q.device).tril(m - n)
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        scores = scores.masked_fill(~attn_mask, float("-inf"))
    elif attn_mask is not None:
        scores = scores + attn_mask.float()
    probs = softmax_with_sinks(scores, sinks).nan_to_num(0.0)  # a row with no key: 0, never NaN
    return (probs @ v.float()).to(q.dtype)
