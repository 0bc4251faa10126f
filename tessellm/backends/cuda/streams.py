"""``OverlapStreams`` on CUDA: a side stream and the events between it and the current one.

Inside ``torch.cuda.graph`` capture the side stream joins the capture through the first event
it waits for (recorded on the capturing stream), and every side launch is waited for by the
capturing stream before the capture ends (``models/micro_batches.py`` waits for each one), so
the graph holds both streams' kernels with the events as its edges. Tensors the side stream
allocates come from the graph's pool (the caching allocator routes every stream of the capture
there). Outside capture (eager steps) the same calls order the two streams at run time, and
the side stream's tensors come from its own blocks of the caching allocator, which graph capture
empties with the current stream's: the graph runner caches both again (``side_streams``).

The GEMM SM carve-out (``gemm_sm_carveout``): concurrent kernels overlap only where both find
free multiprocessors, and cuBLAS sizes a GEMM for all of them. torch's experimental carve-out
(``torch._C._set_sm_carveout_experimental``, ``CUBLASLT_MATMUL_DESC_SM_COUNT_TARGET``) is read
by its cuBLASLt path only (the plain cuBLAS path, torch's default for bf16 ``mm``, ignores it),
so inside the scope the preferred BLAS library is cuBLASLt too; both are put back on exit. The
kernel (and its grid) is chosen when the GEMM is queued, so a graph captured inside the scope
keeps the carved-out grid at every replay. A torch without the carve-out has no
``gemm_sm_carveout`` (None): the engine warns and runs the split uncarved.
"""

from __future__ import annotations

import contextlib

import torch

# Every side stream made here (this process), by (device index, CUDA stream handle): the graph
# runner caches their segments again after capture as it does the current stream's
# (``graph_runner.cached_segments``). Held strongly: torch hands out its pooled streams (a few
# dozen handles a device and priority), so the dict stays small; a WeakSet of the Stream
# wrappers crashed the process (a segfault reading one's ``device``) on torch 2.11 / H100.
_SIDE_STREAMS: "dict[tuple[int, int], torch.cuda.Stream]" = {}


def side_streams() -> list:
    """The side streams ``CudaOverlapStreams`` made (their allocator blocks are theirs)."""
    return list(_SIDE_STREAMS.values())


def _carveout_supported() -> bool:
    return (hasattr(torch._C, "_set_sm_carveout_experimental")
            and hasattr(torch._C, "_get_sm_carveout_experimental")
            and hasattr(torch.backends.cuda, "preferred_blas_library"))


def gemm_sm_carveout(sms: int) -> contextlib.AbstractContextManager:
    """A scope in which cuBLAS(Lt) GEMMs queued target ``sms`` multiprocessors fewer than the
    device has; a carve-out leaving none is refused here, when the scope is made."""
    count = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    if not 0 <= sms < count:
        raise ValueError(f"decode_overlap_sm_carveout={sms} leaves no multiprocessor to the "
                         f"GEMMs of this GPU ({count}); give 0 .. {count - 1}.")
    return _carved(sms)


@contextlib.contextmanager
def _carved(sms: int):
    library = torch.backends.cuda.preferred_blas_library()
    before = torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(sms)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(before)
        torch.backends.cuda.preferred_blas_library(library)


class CudaOverlapStreams:
    """``priority``: of the side stream (CUDA: lower is higher; 0 is the default's)."""

    def __init__(self, device: torch.device, priority: int = 0):
        self.stream = torch.cuda.Stream(device=device, priority=priority)
        _SIDE_STREAMS.setdefault((self.stream.device_index, self.stream.cuda_stream), self.stream)
        # ``OverlapStreams.gemm_sm_carveout`` (optional): None where this torch lacks it
        self.gemm_sm_carveout = gemm_sm_carveout if _carveout_supported() else None

    def record(self) -> torch.cuda.Event:
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.stream.device))
        return event

    @contextlib.contextmanager
    def side(self, after: torch.cuda.Event):
        self.stream.wait_event(after)
        with torch.cuda.stream(self.stream):
            yield

    def wait(self, event: torch.cuda.Event) -> None:
        torch.cuda.current_stream(self.stream.device).wait_event(event)


def overlap_streams() -> CudaOverlapStreams:
    """``Backend.overlap_streams`` of the cuda backend: on the process's current device."""
    return CudaOverlapStreams(torch.device("cuda", torch.cuda.current_device()))
