"""Model-runner side: the step's grammar bitmask onto the rows being sampled.

The engine core sends one mask row per sampled row of each constrained request
(``SchedulerOutput.grammar_bitmask``; ``grammar_bitmask_rows``: request id -> its first mask
row); the runner's sampling rows are in its own order and include unconstrained requests,
which are left alone::

    sampling rows          [ a   x   c   c   y ]    (x, y unconstrained; c verifies a draft)
    grammar_bitmask_rows   {a: 0, c: 1}
    mask rows / indices    [0, 1, 2] / [0, 2, 3]  -> ops.apply_token_bitmask(logits, mask, indices)

The mask goes to the device whole, as filled (row i of the mask applies to logits row
``indices[i]``; no index tensor when that is row i): no gather on the host. It travels through
``MaskUpload``'s two pinned buffers and a non-blocking copy. A runner in the engine core's
process lends those buffers to the core (``MaskUpload.host_buffer``), which fills the mask
straight into pinned memory: the upload then copies nothing on the host.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch

from tessellm.core.sampler import upload as upload_list


class MaskUpload:
    """Host mask -> device through two pinned buffers used in turn. A buffer is handed out
    again (to be filled, or copied into) only after the device copy queued from it last has
    run (its event): in steady state that copy finished a step ago, so nothing waits."""

    def __init__(self, device: torch.device):
        self.device = device
        self._buffers: list[Optional[torch.Tensor]] = [None, None]
        self._events: list = [None, None]
        self._turn = 0

    @property
    def pinned(self) -> bool:
        """False on the CPU: the mask is used where it is."""
        return self.device.type != "cpu"

    def host_buffer(self, num_rows: int, width: int) -> torch.Tensor:
        """``[num_rows, width]`` int32 rows of the next pinned buffer, free to be written."""
        from tessellm.core.step_pipeline import _pinned

        self._turn ^= 1
        event, self._events[self._turn] = self._events[self._turn], None
        if event is not None:
            event.synchronize()
        numel = num_rows * width
        buf = self._buffers[self._turn]
        if buf is None or buf.numel() < numel:
            buf = self._buffers[self._turn] = _pinned(max(numel, 64 * width), torch.int32)
        return buf[:numel].view(num_rows, width)

    def _lent(self, mask: torch.Tensor) -> Optional[int]:
        """Which buffer ``mask`` was filled in (a ``host_buffer`` view), or None."""
        for i, buf in enumerate(self._buffers):
            if buf is not None and mask.data_ptr() == buf.data_ptr() and mask.is_contiguous():
                return i
        return None

    def __call__(self, mask: torch.Tensor) -> torch.Tensor:
        if not self.pinned:
            return mask.contiguous().to(self.device)
        turn = self._lent(mask)
        if turn is None:  # filled elsewhere (a worker process): one copy into pinned memory
            host = self.host_buffer(*mask.shape)
            host.copy_(mask)
            mask, turn = host, self._turn
        out = mask.to(self.device, non_blocking=True)
        event = torch.Event(device=self.device)
        event.record()
        self._events[turn] = event
        return out


def apply_grammar_bitmask(logits: torch.Tensor, row_ids: Sequence[str], bitmask_rows: dict[str, int],
                          bitmask, ops, upload: Optional[MaskUpload] = None) -> None:
    """Mask ``logits`` (``[len(row_ids), V]``; a request with k+1 sampled rows appears k+1
    times in a row) in place with ``ops.apply_token_bitmask``."""
    mask = torch.as_tensor(bitmask)
    target = [-1] * mask.shape[0]  # mask row -> logits row (-1: not sampled here)
    seen: dict[str, int] = {}
    for i, rid in enumerate(row_ids):
        first = bitmask_rows.get(rid)
        if first is not None:
            k = seen.get(rid, 0)
            seen[rid] = k + 1
            target[first + k] = i
    if all(t < 0 for t in target):
        return  # absent here: e.g. a pipeline stage that does not sample
    if min(target) < 0:  # rows of requests not sampled here (never in one engine): drop them
        keep = [j for j, t in enumerate(target) if t >= 0]
        mask, target = mask[keep], [target[j] for j in keep]
    device = logits.device
    mask = (upload or MaskUpload(device))(mask)
    index = None
    if target != list(range(len(target))):
        index = upload_list(target, device)  # pinned: a pageable copy may wait on the host
    ops.apply_token_bitmask(logits, mask, index)
