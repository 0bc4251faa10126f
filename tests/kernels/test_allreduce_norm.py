"""The push all-reduce + residual add + RMSNorm kernel (``backends/cuda/allreduce_norm.py``)
run by several processes at once: bit for bit the unfused path (the sum, then
``TritonOps.fused_add_rms_norm``), which matches the reference ops.

On the CPU the ranks are processes that map the same shared-memory receive buffers, each
running the kernel in Triton's interpreter: the same protocol as over NVLink (remote stores,
polling for the sentinel to go, the slot rotation and its reset), at tiny sizes. On GPUs,
``tests/distributed/test_cuda_parallel.py`` runs it over symmetric memory.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.ops import ReferenceOps  # noqa: E402
from tessellm.testing.ranks import run_ranks  # noqa: E402

HIDDEN = 48  # not a power of two
MAX_ROWS = 5
ROWS = [3, 1, 5, 2, 4, 4]  # shrinking sizes leave the previous call's larger slot to reset


def _x(rank: int, call: int, rows: int, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(zlib.crc32(f"{rank}/{call}".encode()))
    x = torch.randn(rows, HIDDEN, generator=g)
    x[0, :3] = -0.0  # the sentinel's bits: must arrive as a zero, not hang the reader
    return x.to(dtype)


def _expected(world: int, call: int, rows: int, residual, weight, dtype):
    """The unfused path: the all-reduce (a float32 sum in rank order, rounded), then the
    Triton residual add + RMSNorm; and the reference ops' result, to a tolerance."""
    from tessellm.backends.cuda.ops import CudaOps as TritonOps

    s = sum(_x(p, call, rows, dtype).float() for p in range(world)).to(dtype)
    ref_out, ref_res = ReferenceOps().fused_add_rms_norm(s, residual.clone(), weight, 1e-5)
    out, res = TritonOps().fused_add_rms_norm(s, residual.clone(), weight, 1e-5)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref_out, atol=tol, rtol=tol)
    torch.testing.assert_close(res, ref_res, atol=tol, rtol=tol)
    return out, res


def _calls_of(row: int) -> list[int]:
    return [c for c, rows in enumerate(ROWS) if rows > row]


def _rank(rank, world, buffers, dtype):
    from tessellm.backends.cuda.allreduce_norm import PushAllReduceNorm

    ws = PushAllReduceNorm(rank, world, buffers[rank], [b.data_ptr() for b in buffers],
                           HIDDEN, MAX_ROWS)
    weight = torch.linspace(0.5, 1.5, HIDDEN).to(dtype)
    for call, rows in enumerate(ROWS):
        g = torch.Generator().manual_seed(call)
        residual = torch.randn(rows, HIDDEN, generator=g).to(dtype)
        want_out, want_res = _expected(world, call, rows, residual, weight, dtype)
        out, new_res = ws(_x(rank, call, rows, dtype), residual, weight, 1e-5)
        assert new_res.data_ptr() == residual.data_ptr()  # the residual updated in place
        torch.testing.assert_close(new_res, want_res, rtol=0, atol=0)
        torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    assert ws.counts.tolist() == [len(_calls_of(i)) for i in range(MAX_ROWS)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="GPUs run it over symmetric memory")
# float16, not bfloat16: Triton's interpreter truncates float32 -> bfloat16 where GPUs round.
@pytest.mark.parametrize("world,dtype", [(2, torch.float32), (3, torch.float16)])
def test_ranks_in_processes_sum_add_and_norm_like_the_reference(world, dtype):
    from tessellm.backends.cuda.allreduce_norm import PushAllReduceNorm

    buffers = [torch.empty(3 * world * MAX_ROWS * HIDDEN, dtype=dtype).share_memory_()
               for _ in range(world)]
    for b in buffers:
        PushAllReduceNorm.fill_sentinel(b)
    assert os.environ.get("TRITON_INTERPRET") == "1"  # inherited by the spawned ranks
    run_ranks(_rank, world, (world, buffers, dtype), timeout_s=240,
              hang_hint=" (a lost push or a reset too early)")

    # Each row's last call left the peers' rows in its slot; every other element was reset.
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    sentinel = torch.iinfo(bits).min
    for rank, b in enumerate(buffers):
        regions = b.view(bits).view(3, world, MAX_ROWS, HIDDEN)
        for row in range(MAX_ROWS):
            calls = _calls_of(row)
            for slot in range(3):
                for src in range(world):
                    region = regions[slot, src, row]
                    if slot == (len(calls) - 1) % 3 and src != rank:
                        want = _x(src, calls[-1], ROWS[calls[-1]], dtype)[row]
                        want = torch.where(want == 0, torch.zeros_like(want), want)  # -0.0 -> 0
                        assert torch.equal(region, want.view(bits)), (rank, row, slot, src)
                    else:
                        assert bool((region == sentinel).all()), (rank, row, slot, src)
