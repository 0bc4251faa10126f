"""The in-pass state saves of the sequential scan kernels, shared (``@triton.jit`` helpers,
inlined where called): the sequential Mamba scan (``kernels/mamba/chunk_scan.py``) and the
gated delta chunk kernel (``kernels/gated_delta/chunk.py``) walk a sequence a chunk of ``Q``
tokens at a time and, with a ``recurrent_pieces.SavePlan``, end a chunk at each save's offset
and store the state there into its snapshot slot::

    k, k_end = first[s], first[s + 1]          # the sequence's saves, offsets ascending
    c0 = 0
    while c0 < length or k < k_end:
        end, cut = chunk_end(c0, length, k, k_end, offsets, Q)
        state = <the kernel's chunk c0 .. end - 1>(state)
        k = keep_state(state, end, cut, k, k_end, slots, snapshots, ...)
        c0 = end

(Two saves at one offset: the second's chunk is empty, and leaves the state as it is.)
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def chunk_end(c0, length, k, k_end, save_off_ptr, Q: tl.constexpr):
    """The end of the chunk from token ``c0``: ``Q`` tokens on, or sooner the next save's
    offset (``length`` when none is left); and that cut (the offset or ``length``)."""
    cut = tl.load(save_off_ptr + k, mask=k < k_end, other=0).to(tl.int64)
    cut = tl.where(k < k_end, cut, length)
    return tl.minimum(c0 + Q, cut), cut


@triton.jit
def keep_state(state, end, cut, k, k_end, save_slot_ptr, snap_ptr, snap_slot, inner, smask):
    """After the chunk ending at ``end``: where it ends at save ``k``'s offset, ``state`` (this
    program's block, at ``inner`` of a slot) stored into the save's snapshot slot; returns the
    next save's index."""
    if (end == cut) & (k < k_end):
        pool_slot = tl.load(save_slot_ptr + k).to(tl.int64)
        tl.store(snap_ptr + pool_slot * snap_slot + inner, state.to(snap_ptr.dtype.element_ty),
                 mask=smask)
        k += 1
    return k
