"""Model-runner side: the step's grammar bitmask onto the rows being sampled.

The engine core sends one mask row per sampled row of each constrained request
(``SchedulerOutput.grammar_bitmask``; ``grammar_bitmask_rows``: request id -> its first mask
row); the runner's sampling rows are in its own order and include unconstrained requests,
which are left alone::

    sampling rows          [ a   x   c   c   y ]    (x, y unconstrained; c verifies a draft)
    grammar_bitmask_rows   {a: 0, c: 1}
    mask rows / indices    [0, 1, 2] / [0, 2, 3]  -> ops.apply_token_bitmask(logits, mask, indices)

The mask reaches the device through a pinned host buffer and a non-blocking copy
(``MaskUpload``); when every sampling row is constrained, in order, no index tensor is sent.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch


class MaskUpload:
    """Host mask -> device through two pinned buffers used in turn; a buffer is written again
    only after the copy queued from it two uploads ago has run (its event)."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[Optional[torch.Tensor]] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if self.device.type == "cpu":
            return mask.contiguous()
        from tessellm.core.step_pipeline import _pinned

        self._turn ^= 1
        event, self._events[self._turn] = self._events[self._turn], None
        if event is not None:
            event.synchronize()
        buf = self._buffers[self._turn]
        if buf is None or buf.numel() < mask.numel():
            buf = self._buffers[self._turn] = _pinned(mask.numel(), torch.int32)
        host = buf[:mask.numel()].view(mask.shape)
        host.copy_(mask)
        out = host.to(self.device, non_blocking=True)
        event = torch.Event(device=self.device)
        event.record()
        self._events[self._turn] = event
        return out


def apply_grammar_bitmask(logits: torch.Tensor, row_ids: Sequence[str], bitmask_rows: dict[str, int],
                          bitmask, ops, upload: Optional[MaskUpload] = None) -> None:
    """Mask ``logits`` (``[len(row_ids), V]``; a request with k+1 sampled rows appears k+1
    times in a row) in place with ``ops.apply_token_bitmask``."""
    mask_rows, indices = [], []
    seen: dict[str, int] = {}
    for i, rid in enumerate(row_ids):
        first = bitmask_rows.get(rid)
        if first is not None:
            k = seen.get(rid, 0)
            seen[rid] = k + 1
            mask_rows.append(first + k)
            indices.append(i)
    if not indices:
        return  # absent here: e.g. a pipeline stage that does not sample
    mask = torch.as_tensor(bitmask)
    if mask_rows != list(range(mask.shape[0])):
        mask = mask[mask_rows]
    device = logits.device
    mask = (upload or MaskUpload(device))(mask)
    index = None
    if indices != list(range(logits.shape[0])):
        index = torch.tensor(indices, dtype=torch.int64).to(device, non_blocking=True)
    ops.apply_token_bitmask(logits, mask, index)
