"""Programmatic dependent launch (PDL, Hopper and later) for the decode step's Triton kernels.

A decode step at batch 1 is some 300 short kernels in a row; between two of them the GPU drains
the first (its last wave's tail) and only then launches and ramps up the second: ~1-3 us each.
With PDL the next kernel's programs are launched while the current one's last wave still runs:

    kernel A:  [ gdc_launch_dependents | gdc_wait | body ............ ]
    kernel B:              [ launched early, parked in gdc_wait ] [ body ... ]

Every kernel here starts with ``pdl_start``: it first lets its successor launch, then waits
until its predecessor has completed and its writes are visible, before touching any memory.
So a kernel never reads what its predecessor has not finished writing, and never writes what
its predecessor may still read; the chain is transitive (B's wait returns only after A, which
itself waited for its own predecessor). Kernels that do not take part (torch's, cuBLAS, NCCL)
trigger their successor only at exit, which is ordinary stream order.

PDL is used only inside ``graph_scope`` (the CUDA graph runner's capture of the decode step
and one warm-up of it on the current stream, which compiles the PDL variants outside capture):
eager steps gain nothing from it (the host launches slower than the kernels run), and outside a
graph a kernel's predecessor may be a cross-stream event wait rather than a kernel.

Loads of what no kernel of the step writes (the step's inputs: positions, slot mapping, sequence
lengths, block tables, cos/sin tables, and the KV cache of tokens cached in earlier steps) may go
before the wait, between ``pdl_launch`` and ``pdl_wait``: their DRAM latency then hides under
the predecessor (the split-KV decode kernel prefetches its first K/V tile there). Such a kernel
still writes nothing before ``pdl_wait``. Weights are such inputs too: under
``TESSELLM_GEMV_PREWAIT`` the one-row GEMVs load their first weight tiles and scales there, or
ask the L2 for their weight slice (``prefetch_l2``), so the next GEMV's weights already stream
while a norm or the attention before it runs.

On by default on sm90+ (``TESSELLM_PDL=0`` turns it off, ``tessellm.envs``). Measured on an
H200 (Llama-3.1-8B shapes, bf16, CUDA graphs, 2026-11-21, two runs each way in one session):
B1 4.144 / 4.144 ms per token against 4.331 / 4.335 without, F 10,332 against 10,312 tok/s.
Validated there by the kernel, fp32-parity, quantization and device tests in one process with
PDL on, and by engines switching PDL on, off and on again in one process (greedy tokens equal
HF's in every one). Never used before sm90, on ROCm or in Triton's interpreter.
"""

from __future__ import annotations

import contextlib
import functools

import torch
import triton
import triton.language as tl

from tessellm import envs


@functools.lru_cache(maxsize=None)
def _enabled(index: int) -> bool:
    """Once per device (the environment is read at the first launch)."""
    return (torch.version.hip is None and envs.cuda_pdl()
            and torch.cuda.get_device_capability(index)[0] >= 9)


_scope_depth = 0


@contextlib.contextmanager
def graph_scope():
    """Launches inside use PDL (where enabled): the graph runner's warm-up and capture."""
    global _scope_depth
    _scope_depth += 1
    try:
        yield
    finally:
        _scope_depth -= 1


def pdl_enabled(device: torch.device) -> bool:
    return (_scope_depth > 0 and device.type == "cuda"
            and _enabled(device.index if device.index is not None else torch.cuda.current_device()))


def pdl_args(device: torch.device) -> dict:
    """Launch arguments for a kernel taking ``USE_PDL``: the constexpr and Triton's launch flag."""
    if pdl_enabled(device):
        return {"USE_PDL": True, "launch_pdl": True}
    return {"USE_PDL": False}


@triton.jit
def pdl_start(USE_PDL: tl.constexpr):
    """First statement of a kernel launched with ``pdl_args``: see the module docstring."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()
        tl.extra.cuda.gdc_wait()


@triton.jit
def pdl_launch(USE_PDL: tl.constexpr):
    """``pdl_start``'s first half: lets the successor launch. Loads of the step's inputs may
    follow (module docstring), then ``pdl_wait`` before anything else."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def pdl_wait(USE_PDL: tl.constexpr):
    """``pdl_start``'s second half: the predecessor has completed and its writes are visible."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def prefetch_l2(addr, nbytes):
    """Ask the L2 for ``nbytes`` bytes from byte address ``addr`` (scalars, int64 / int32):
    one ``cp.async.bulk.prefetch.L2`` from the program's first thread, the range widened to
    whole 16-byte units (the instruction's alignment; an allocation is never smaller than
    one). sm90+, compiled only (inline PTX): callers guard it with a constexpr. A hint: nothing
    waits for it, it writes nothing."""
    lo = tl.full([1], 0, tl.int64) + (addr & -16)  # a one-element tensor: the form every
    size = (((addr + nbytes + 15) & -16) - lo).to(tl.int32)  # Triton takes for inline asm
    tl.inline_asm_elementwise(
        ("{ .reg .pred p; .reg .b32 t;\n"
         "mov.u32 t, %tid.x;\n"
         "setp.eq.u32 p, t, 0;\n"
         "@p cp.async.bulk.prefetch.L2.global [$1], $2;\n"
         "mov.u32 $0, 0; }"),
        "=r,l,r", [lo, size], dtype=tl.int32, is_pure=False, pack=1)
