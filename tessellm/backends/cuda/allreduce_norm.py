"""All-reduce + residual add + RMSNorm in one kernel, over buffers every rank maps (NVLink P2P).

Under tensor parallelism a decode step all-reduces a row-parallel layer's partial output and
adds it to the residual stream before the next RMSNorm, twice per layer. Done as torch's
one-shot all-reduce and then the norm kernel, each of those is two launches and a barrier
across GPUs (a signal written to every peer, then a wait for theirs) before any data moves.

Here it is one kernel and no barrier: ranks *push* and readers poll (the "Lamport" scheme of
TensorRT-LLM's low-latency all-reduce). Each rank owns a receive buffer in symmetric memory,
three slots of ``[world, max_rows, hidden]``, every element initialised to a sentinel
(negative zero's bit pattern) that real data never carries (a -0.0 in x is sent as +0.0, which
sums alike). Row ``i`` keeps a call count ``c`` on the device (``counts[i]``)::

    program i of rank r (row i), slot c % 3:
      1. store x[i] into slot[r][i] of every peer's buffer (remote stores)
      2. reset row i of slot (c + 2) % 3, its previous call's, to the sentinel
      3. for p in rank order: spin on slot[p][i] of its own buffer until no element is the
         sentinel, add it in float32 (its own x for p == r): the sum is the same on every rank
      4. residual add and RMSNorm on the row (the rounding of ``TritonOps.fused_add_rms_norm``
         applied to the sum rounded to x's dtype); counts[i] = c + 1

Every rank runs the same calls with the same row counts, so the counts agree across ranks.
Step 2 is safe because no peer writes row i of slot (c + 2) % 3 again before its call c + 2
of that row, which needs this rank's data of call c + 1, which this rank sends only after this
kernel has finished. Programs share nothing (no atomics, no fence); each element is polled
until it arrives, so no flag orders the data; a CUDA graph replays the rotation correctly
however many calls it holds, since the counts live on the device.

The buffers are torch symmetric memory (``torch.distributed._symmetric_memory``); NVLink
multicast is not used. Inputs above ``max_bytes`` per rank (prefill) take the unfused path:
``tp.all_reduce`` then ``fused_add_rms_norm``.

Measured on H200s (Llama-3.1-8B shapes, B1, CUDA graphs, 2026-11-21): a first version, whose
programs met at an atomic counter (a fence per call), gave TP=2 2.789 ms per token against
3.083 with two kernels, TP=4 2.057 against 2.297, in one run; this one TP=2 2.712 (TP=1
4.173, 0.650x) and TP=4 1.988 (``benchmarks/results/h200-multi-2026-11-21e/`` and ``-f/``).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import triton
import triton.language as tl

from tessellm.kernels.pdl import pdl_args, pdl_start
from tessellm.kernels.norm import NORM_LAUNCH_OPTIONS, add_norm_buffers, add_rms_norm_row

logger = logging.getLogger(__name__)

_SLOTS = 3


@triton.jit
def _sentinel_mask(v, BITS: tl.constexpr):
    """Which elements of ``v`` carry the sentinel (negative zero's bits)."""
    if BITS == 16:
        return v.to(tl.uint16, bitcast=True) == 0x8000
    else:
        return v.to(tl.uint32, bitcast=True) == 0x80000000


@triton.jit
def _sentinel_block(BLOCK: tl.constexpr, dt: tl.constexpr, BITS: tl.constexpr):
    if BITS == 16:
        return tl.full([BLOCK], 0x8000, tl.uint16).to(dt, bitcast=True)
    else:
        return tl.full([BLOCK], 0x80000000, tl.uint32).to(dt, bitcast=True)


@triton.jit
def _ar_add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, bufs_ptr, counts_ptr,
                            hidden, eps, stride_x, stride_res, stride_out, stride_res_out,
                            max_rows,
                            RANK: tl.constexpr, WORLD: tl.constexpr, BITS: tl.constexpr,
                            BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    """One row per program; see the module docstring. ``bufs_ptr``: int64 ``[WORLD]``, every
    rank's receive buffer as this process addresses it."""
    pdl_start(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    dt = x_ptr.dtype.element_ty
    count = tl.load(counts_ptr + row)
    slot = count % 3
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden

    # 1. push this rank's row to every peer (a -0.0 goes out as +0.0)
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    x = tl.where(_sentinel_mask(x, BITS), tl.zeros([BLOCK], dt), x)
    for p in tl.static_range(WORLD):
        if p != RANK:
            peer = tl.load(bufs_ptr + p).to(tl.pointer_type(dt))
            tl.store(peer + ((slot * WORLD + RANK) * max_rows + row) * hidden + cols, x,
                     mask=mask)

    # 2. reset this row of the slot its previous call used (while the pushes travel)
    own = tl.load(bufs_ptr + RANK).to(tl.pointer_type(dt))
    prev = (count + 2) % 3
    sentinel = _sentinel_block(BLOCK, dt, BITS)
    for p in tl.static_range(WORLD):
        if p != RANK:
            tl.store(own + ((prev * WORLD + p) * max_rows + row) * hidden + cols, sentinel,
                     mask=mask)

    # 3. sum every rank's row in rank order, polling for the peers' arrivals
    acc = tl.zeros([BLOCK], tl.float32)
    for p in tl.static_range(WORLD):
        if p == RANK:
            acc += x.to(tl.float32)
        else:
            src = own + ((slot * WORLD + p) * max_rows + row) * hidden + cols
            v = tl.load(src, mask=mask, other=0.0, volatile=True)
            while tl.sum(_sentinel_mask(v, BITS).to(tl.int32), 0) > 0:
                v = tl.load(src, mask=mask, other=0.0, volatile=True)
            acc += v.to(tl.float32)

    # 4. residual add and RMSNorm of the sum rounded to dt (an all-reduce's output)
    add_rms_norm_row(acc.to(dt).to(tl.float32), res_ptr + row * stride_res + cols,
                     res_out_ptr + row * stride_res_out + cols, w_ptr,
                     out_ptr + row * stride_out + cols, cols, mask, hidden, eps)
    tl.store(counts_ptr + row, count + 1)


class PushAllReduceNorm:
    """One rank's receive buffer and row counts for ``_ar_add_rms_norm_kernel``.

    ``buffer``: ``[3 * world * max_rows * hidden]`` of a 16- or 32-bit float dtype on this
    rank's device, every element the sentinel, that peers can store into; ``peer_ptrs``: every
    rank's buffer as addresses in this process. ``from_symmetric_memory`` builds them over
    NVLink; a test can build them from tensors several processes map (shared memory, on the
    CPU with Triton's interpreter).
    """

    def __init__(self, rank: int, world: int, buffer: torch.Tensor, peer_ptrs: list[int],
                 hidden: int, max_rows: int):
        if buffer.numel() != _SLOTS * world * max_rows * hidden:
            raise ValueError(f"receive buffer holds {buffer.numel()} elements; "
                             f"{_SLOTS} * {world} * {max_rows} * {hidden} needed.")
        if buffer.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"no push all-reduce for {buffer.dtype}; bfloat16, float16 or "
                             "float32.")
        self.rank, self.world = rank, world
        self.dtype = buffer.dtype
        self.hidden, self.max_rows = hidden, max_rows
        self.buffer = buffer
        self.bits = buffer.element_size() * 8
        self.peer_ptrs = torch.tensor(peer_ptrs, dtype=torch.int64, device=buffer.device)
        self.counts = torch.zeros(max_rows, dtype=torch.int32, device=buffer.device)

    @staticmethod
    def fill_sentinel(buffer: torch.Tensor) -> None:
        """Every element of ``buffer`` to the sentinel (-0.0's bits)."""
        buffer.view(torch.int16 if buffer.element_size() == 2 else torch.int32).fill_(
            -(1 << (buffer.element_size() * 8 - 1)))

    @classmethod
    def from_symmetric_memory(cls, group, device: torch.device, dtype: torch.dtype,
                              hidden: int, max_bytes: int) -> "PushAllReduceNorm":
        """Collective over ``group`` (every rank calls it, outside graph capture)."""
        import torch.distributed as dist
        import torch.distributed._symmetric_memory as symm_mem

        group = group or dist.group.WORLD
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        max_rows = max(1, max_bytes // (hidden * torch.empty(0, dtype=dtype).element_size()))
        buffer = symm_mem.empty(_SLOTS * world * max_rows * hidden, dtype=dtype, device=device)
        handle = symm_mem.rendezvous(buffer, group.group_name)
        offset = buffer.data_ptr() - handle.buffer_ptrs[handle.rank]
        offsets = [None] * world
        dist.all_gather_object(offsets, offset, group=group)
        if len(set(offsets)) != 1 or handle.rank != rank:
            raise RuntimeError(f"symmetric buffers are not symmetric (offsets {offsets}).")
        cls.fill_sentinel(buffer)
        torch.cuda.synchronize(device)
        dist.barrier(group)  # every rank's sentinel fill is done before any rank pushes
        return cls(rank, world, buffer, [p + offset for p in handle.buffer_ptrs], hidden,
                   max_rows)

    def fits(self, x: torch.Tensor) -> bool:
        return (x.dtype == self.dtype and x.shape[-1] == self.hidden
                and x.numel() <= self.max_rows * self.hidden)

    def __call__(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
        """``fused_add_rms_norm(all_reduce(x), residual, weight, eps)``: the residual is
        updated in place where ``fused_add_rms_norm`` would update it."""
        x2, r2, out, new_res, result = add_norm_buffers(x, residual, weight)
        rows = x2.shape[0]
        if rows:
            block = triton.next_power_of_2(self.hidden)
            _ar_add_rms_norm_kernel[(rows,)](
                x2, r2, weight.contiguous(), out, new_res, self.peer_ptrs, self.counts,
                self.hidden, eps, x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0),
                self.max_rows, RANK=self.rank, WORLD=self.world, BITS=self.bits, BLOCK=block,
                num_warps=min(16, max(1, block // 512)), **NORM_LAUNCH_OPTIONS,
                **pdl_args(x.device))
        return result


def workspace(tp, dtype: torch.dtype, hidden: int) -> Optional[PushAllReduceNorm]:
    """``tp``'s push buffers for rows of ``hidden`` ``dtype`` elements, made at the first call
    outside graph capture (a collective: every rank makes its first call at the same point of
    the same step); None where the group has no symmetric memory (``tp.fast_all_reduce``
    unset) or making them failed."""
    key = ("cuda.allreduce_norm", dtype, hidden)
    if key in tp.workspaces:
        return tp.workspaces[key]
    fast = tp.fast_all_reduce
    if fast is None or torch.cuda.is_current_stream_capturing():
        return None
    try:
        ws = PushAllReduceNorm.from_symmetric_memory(tp.group, fast.buffer.device, dtype,
                                                     hidden, fast.max_bytes)
    except Exception as exc:  # noqa: BLE001 - an optional fast path; the unfused one works
        logger.warning("Fused all-reduce + RMSNorm unavailable (%s: %s); unfused.",
                       type(exc).__name__, exc)
        ws = None
    tp.workspaces[key] = ws
    return ws
