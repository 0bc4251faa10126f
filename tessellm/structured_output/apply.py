"""Model-runner side: the step's grammar bitmask onto the rows being sampled.

The engine core sends one mask row per sampled row of a constrained request this step (k + 1
for k drafts; ``SchedulerOutput.grammar_bitmask``, ``grammar_bitmask_rows``: request id -> its
first mask row); the runner's sampling rows are in its own order and include unconstrained
requests, which are left alone::

    sampling rows          [ a   x   c   y ]        (x, y unconstrained)
    grammar_bitmask_rows   {a: 0, c: 1}
    mask rows / indices    [0, 1] / [0, 2]   -> ops.apply_token_bitmask(logits, mask, indices)
"""

from __future__ import annotations

from typing import Sequence

import torch


def apply_grammar_bitmask(logits: torch.Tensor, row_ids: Sequence[str], bitmask_rows: dict[str, int],
                          bitmask, ops) -> None:
    """Mask ``logits`` (``[len(row_ids), V]``) in place with ``ops.apply_token_bitmask``."""
    mask_rows, indices, seen = [], [], {}
    for i, rid in enumerate(row_ids):
        row = bitmask_rows.get(rid)
        if row is not None:  # a request verifying k drafts has k + 1 consecutive rows
            seen[rid] = seen.get(rid, -1) + 1
            mask_rows.append(row + seen[rid])
            indices.append(i)
    if not indices:
        return  # absent here: e.g. a pipeline stage that does not sample
    mask = torch.as_tensor(bitmask)
    if mask_rows != list(range(mask.shape[0])):
        mask = mask[mask_rows]
    device = logits.device
    ops.apply_token_bitmask(logits, mask.to(device, non_blocking=True).contiguous(),
                            torch.tensor(indices, dtype=torch.int64, device=device))
