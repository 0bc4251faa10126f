"""Split-K for the one-row GEMVs with the partial sums combined inside the launch: the last
program of each output tile to finish adds the K ranges' float32 planes in a fixed order and
stores the output (``TESSELLM_GEMV_SPLIT_LAST``, ``envs.gemv_split_last``).

The plane path (``common._split_out`` / ``_split_sum``) pays two more kernels after the GEMV
(torch's sum over the planes and the cast), outside PDL, so the one-row tables split only where
the N tiles alone leave SMs idle. Here the GEMV's programs do it: each stores its plane as
before, then (after a CTA barrier) one gpu-scope acq_rel add on its tile's int32 counter; the
program that takes the count to ``SPLIT`` resets the counter and, its acquire having made the
other programs' stores visible, reads the tile's ``SPLIT`` planes past L1 (``.cg``) and stores
``((p0 + p1) + p2) + ...`` in the output's dtype. The order is fixed (plane 0 first, whatever
order the programs finish in), so two calls give the same bits. The semaphore is the decode
attention's last-split reduce (``attention/decode.py``) and ``norm_epilogue.py``'s, here one
counter an N tile, so no single address takes every program's atomic.

What it buys (to be measured, ``benchmarks/gemv8_device.sh``): more, shorter programs for the
small products (qkv, o at batch 1 lose ~2-2.5 us a launch to ramp and tail at one wave of
two-step programs), so a program's whole K range fits the weight tile it loads before its PDL
wait, and the last wave's programs finish staggered rather than together; what it costs: the
planes' stores and the last program's two L2 round trips (the atomic, the planes) on the tail.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm import envs

# TESSELLM_GEMV_SPLIT_LAST (``envs.gemv_split_last``), read once; benchmarks and tests set it
# between captures (a captured graph keeps the launches it was captured with).
ENABLED = envs.gemv_split_last()


def split_last_enabled() -> bool:
    return ENABLED


@triton.jit
def split_last_combine(part_ptr, y_ptr, counter_ptr, pid_n, rn, M, N, stride_split,
                       stride_pm, stride_ym, BLOCK_M: tl.constexpr, SPLIT: tl.constexpr):
    """Called by every program of a split-K GEMV after storing its plane of outputs ``rn``
    (rows < M of ``part_ptr``'s ``[SPLIT, M, N]`` float32 planes, ``stride_split`` and
    ``stride_pm`` elements apart); the last of tile ``pid_n``'s SPLIT programs stores
    ``y[r, rn] = sum over planes 0..SPLIT-1 in order`` (y's dtype, row stride ``stride_ym``)."""
    tl.debug_barrier()  # every thread's plane stores before the counter's release
    done = tl.atomic_add(counter_ptr + pid_n, 1, sem="acq_rel", scope="gpu")
    if done == SPLIT - 1:
        tl.atomic_xchg(counter_ptr + pid_n, 0, sem="relaxed", scope="gpu")  # the next launch
        ok_n = rn < N
        for r in tl.static_range(BLOCK_M):
            ok = ok_n & (tl.zeros_like(rn) + r < M)
            row = part_ptr + r * stride_pm + rn
            acc = tl.load(row, mask=ok, other=0.0, cache_modifier=".cg")
            for s in tl.static_range(1, SPLIT):
                acc += tl.load(row + s * stride_split, mask=ok, other=0.0, cache_modifier=".cg")
            tl.store(y_ptr + r * stride_ym + rn, acc.to(y_ptr.dtype.element_ty), mask=ok)


_COUNTERS: dict = {}


def tile_counters(device: torch.device, key: int, tiles: int) -> torch.Tensor:
    """The int32 counters (one an N tile) of the split-K GEMV over weight ``key`` (its data
    pointer) with ``tiles`` N tiles on ``device``: zero, and left zero by every launch (each
    tile's last program resets its own). Per weight and tiling, so launches on different
    streams or tilings never share one; made once, outside graph capture in the engine (its
    warm-up runs each shape eagerly first, as ``norm_epilogue._counter``)."""
    k = (device.index, key, tiles)
    ctr = _COUNTERS.get(k)
    if ctr is None:
        ctr = _COUNTERS[k] = torch.zeros(tiles, dtype=torch.int32, device=device)
    return ctr


def split_last_args(y: Optional[torch.Tensor], counters: Optional[torch.Tensor],
                    split: int, dummy: torch.Tensor) -> dict:
    """A kernel's combine arguments: ``y_ptr``, ``split_ctr_ptr`` and ``SPLIT_LAST`` (the
    split, 0: off, placeholders for the pointers)."""
    if y is None:
        return dict(y_ptr=dummy, split_ctr_ptr=dummy, SPLIT_LAST=0)
    return dict(y_ptr=y, split_ctr_ptr=counters, SPLIT_LAST=split)
