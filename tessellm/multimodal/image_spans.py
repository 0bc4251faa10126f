"""Key limits over image spans (``AttentionBatch.key_limits``) for a model whose image tokens
attend to their whole image (Gemma 3): a step's row at position ``p`` inside an image's span
``[offset, end)`` sees keys up to ``end - 1``; every other row up to ``p`` (causal)::

    positions   5  6  7  8  9 10 11        image span [7, 10)
    key limits  5  6  9  9  9 10 11

Invariant (the scheduler's ``whole_images``): a step that computes a token of an image also
computes the image's last token, so the keys a row may see are in the cache when it attends.
A span that ends past the step is a scheduling bug, raised here rather than attended wrongly.
"""

from __future__ import annotations

from typing import Optional, Sequence

import numpy as np


def image_key_limits(states: Sequence, counts: Sequence[int], positions: np.ndarray,
                     query_start_loc: np.ndarray) -> Optional[np.ndarray]:
    """int32 ``[T]`` key limits for the step (``states[i]`` computes ``counts[i]`` tokens from
    its ``num_computed_tokens``, at rows ``query_start_loc[i]`` on, at ``positions``), or None
    when it computes no image token (every row causal)."""
    limits = None
    for i, (st, n) in enumerate(zip(states, counts)):
        c = st.num_computed_tokens
        for f in st.mm_features:
            lo, hi = max(c, f.offset), min(c + n, f.end)
            if lo >= hi:
                continue
            if f.end > c + n:
                raise RuntimeError(f"A step computes tokens {c}..{c + n - 1} of request "
                                   f"{st.request_id}, which end inside the image at "
                                   f"{f.offset}..{f.end - 1}; its tokens would miss the image's "
                                   "later keys (the scheduler keeps images whole for this model).")
            if limits is None:
                limits = positions.astype(np.int32)
            row = int(query_start_loc[i]) + lo - c
            limits[row:row + hi - lo] = f.end - 1
    return limits
