"""The model runner's KV cache: one (k, v) pair of tensors per attention layer, and its size.

A mixin of ``ModelRunner`` (tessellm/core/model_runner.py), which owns the state used here:
``kernel`` (whether it wants the cache heads-major), ``model`` and ``spec`` (whose attention
layers hold cache), ``block_size`` and ``device``. The worker sizes the cache from
``kv_bytes_per_block`` and then calls ``allocate_kv_cache`` once (``distributed/worker.py``);
``profile_run`` allocates one block per layer for its forward and frees it. On CUDA the cache
is one allocation (``kv_cache_tensors``: per-layer tensors could take a block the memory
profile left cached, core/memory_profile.py).

With ``--kv-offloading-size`` the worker also calls ``allocate_host_kv_cache``: a host buffer
per cache tensor, block-major like the cache's storage, pinned where the device can pin; the
step's ``kv_transfers`` copy whole blocks between the two (``apply_kv_transfers``) through the
backend's ``swap_blocks`` (``FusedOps``, optional; the reference is
``backends/reference/kv_transfer.py``).
"""

from __future__ import annotations

import mmap

import numpy as np
import torch

from tessellm.backends.reference.kv_transfer import swap_blocks as reference_swap_blocks
from tessellm.core.host_kv_buffer import HostKVBuffer


class RunnerKVCache:
    """Allocation of the attention layers' ``k_cache`` / ``v_cache`` and their bytes per block."""

    # A KV connector's worker half (tessellm/kv_transfer), set by the worker; None: none.
    kv_connector = None
    # Under tensor parallelism: (request ids, failed here) -> failed on any rank (the worker's).
    kv_load_agree = None
    # The last step's saves under way (a future), for the worker to wait on; None: none.
    pending_save = None

    def allocate_kv_cache(self, num_blocks: int, dtype: torch.dtype) -> None:
        """Zero-filled so padded reads are finite. One (k, v) pair of tensors per layer, shaped
        ``[blocks, block_size, kv_heads, head_size]``; a kernel declaring ``kv_cache_heads_major``
        gets that as a ``transpose(1, 2)`` view of ``[blocks, kv_heads, block_size, head]``
        storage (IPEX's CPU paged attention reads it without a copy)."""
        heads_major = getattr(self.kernel, "kv_cache_heads_major", False)
        layers = self.kv_layers()
        shapes = []
        for attn in layers:
            shape = (num_blocks, self.block_size, attn.num_kv_heads, attn.head_size)
            if heads_major:
                shape = (num_blocks, attn.num_kv_heads, self.block_size, attn.head_size)
            # A latent cache (MLA, ``layers/mla_attention.py``) has no values of its own.
            shapes += [shape, shape] if _caches_values(attn) else [shape]
        for attn in layers:  # the old cache is freed before the new one is allocated
            attn.k_cache = attn.v_cache = None
        tensors = iter(kv_cache_tensors(shapes, dtype, self.device))
        for attn in layers:
            attn.k_cache = next(tensors)
            attn.v_cache = next(tensors) if _caches_values(attn) else None
            if heads_major:
                attn.k_cache = attn.k_cache.transpose(1, 2)
                attn.v_cache = attn.v_cache.transpose(1, 2) if attn.v_cache is not None else None

    def kv_bytes_per_block(self, dtype: torch.dtype) -> int:
        elem = torch.empty(0, dtype=dtype).element_size()
        return sum((2 if _caches_values(a) else 1) * self.block_size * a.num_kv_heads
                   * a.head_size * elem for a in self.kv_layers())

    def allocate_host_kv_cache(self, num_blocks: int) -> None:
        """The host tier's buffer: ``num_blocks`` blocks of every cache tensor in host memory,
        pinned where the device pins (``core/host_kv_buffer.py``)."""
        pin = self.device.type not in ("cpu", "xla")
        self.host_kv = HostKVBuffer(self._block_major_caches(), num_blocks, pin, _host_zeros)
        if not hasattr(self, "swap_blocks"):
            self.swap_blocks = reference_swap_blocks

    def apply_kv_transfers(self, transfers: list) -> None:
        """The step's copies between the device cache and the host tier, in their order."""
        self.host_kv.apply(transfers, self._block_major_caches(), self.swap_blocks)

    def load_external_kv(self, meta, wait: float = 0.0) -> tuple[list, dict]:
        """A KV connector's loads of the step, before its forward: the requests whose load
        failed on this rank (or any tensor-parallel rank), and the background loads the step
        asks about (``meta["check"]``) that finished on every rank (request id -> loaded);
        ``wait``: seconds to wait for one (a step with nothing else to do)."""
        if meta is None or self.kv_connector is None:
            return [], {}
        failed = self.kv_connector.start_load_kv(meta)
        if self.kv_load_agree is not None and meta.get("loads"):
            failed = self.kv_load_agree([rid for rid, _ in meta["loads"]], failed)
        if failed:  # what the step computes over those blocks is not to be saved
            self.kv_connector.load_failed(failed)
        finished = {}
        if meta.get("check"):
            finished = self.kv_connector.get_finished_loads(meta["check"], wait)
            if self.kv_load_agree is not None:
                finished = self.kv_load_agree(meta["check"], finished)
        return failed, finished

    def settled_external_saves(self, timeout: float = 0.0):
        """A KV connector's saves settled since start (``[saved, failed, dropped]`` blocks, or
        None); ``timeout``: seconds to wait for those in flight (nothing else to run)."""
        if self.kv_connector is None:
            return None
        return self.kv_connector.save_totals(timeout)

    def guard_external_kv_reads(self, sched) -> None:
        """Before the step touches the cache: a KV connector's copies still reading blocks the
        step may write (freed and given out again) finish first, on the device."""
        if self.kv_connector is not None and self.kv_connector.pending_block_reads():
            written = {b for r in sched.new_requests for b in r.block_ids}
            written.update(b for c in sched.cached_requests for b in c.new_block_ids)
            self.kv_connector.before_writing(written)

    def save_external_kv(self, meta) -> None:
        """A KV connector's saves of the blocks the step filled, after its forward was queued."""
        if meta is not None and self.kv_connector is not None:
            self.pending_save = self.kv_connector.save_kv(meta)

    def _block_major_caches(self) -> list[torch.Tensor]:
        """Every cache tensor as its block-major storage (a heads-major cache's transposed view
        undone): the tensors whose dim 0 is the block."""
        out = []
        for attn in self.kv_layers():
            for t in (attn.k_cache, attn.v_cache):
                if t is None:
                    continue
                out.append(t if t.is_contiguous() else t.transpose(1, 2))
        return out

    def kv_layers(self) -> list:
        """Every attention layer holding KV cache: the target's, then a proposer's (a draft
        model's layers use the same block ids as the target's)."""
        extra = self.spec.attention_layers() if self.spec is not None else []
        return list(self.model.attention_layers()) + list(extra)


# Each tensor of a one-allocation cache starts at a multiple of this many bytes.
_KV_ALIGN = 256


def kv_cache_tensors(shapes: list[tuple[int, ...]], dtype: torch.dtype, device: torch.device,
                     one_allocation: bool = None) -> list[torch.Tensor]:
    """Zeroed, contiguous cache tensors of these shapes. On CUDA (``one_allocation`` None) they
    are views of one allocation, each at a multiple of 256 bytes: the caching allocator serves
    a request from the smallest cached free block that fits, so a per-layer tensor smaller than
    a block the memory profile's step left cached takes it (workload F on an H100: ~800 MiB
    tensors against the 896 MiB block of a 16384-token gate/up projection), and the first step
    of that size allocates a new segment. One allocation larger than any cached block leaves
    them all to the steps (core/memory_profile.py). Elsewhere one allocation per tensor
    (``_zeros``: lazily backed host memory on the cpu)."""
    if one_allocation is None:
        one_allocation = device.type == "cuda"
    elem = torch.empty(0, dtype=dtype).element_size()
    sizes = [int(np.prod(s)) * elem for s in shapes]
    if not one_allocation or not sum(sizes):
        return [_zeros(s, dtype, device) for s in shapes]
    offsets, total = [], 0
    for n in sizes:
        offsets.append(total)
        total += -(-n // _KV_ALIGN) * _KV_ALIGN
    buf = torch.zeros(total, dtype=torch.uint8, device=device)
    return [buf[o:o + n].view(dtype).view(s) for o, n, s in zip(offsets, sizes, shapes)]


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Zeros; in host memory an anonymous mapping, so the OS zeroes pages lazily as they are
    used (filling a multi-GiB CPU cache eagerly costs seconds at start-up), with transparent
    huge pages asked for: a first write then faults in 2 MiB at a time instead of 4 KiB.
    Measured on 2 cores, workload C (benchmarks/README.md, "cpurest"): with 4 KiB pages the
    cache writes of a decode step took ~25x their warm time in page faults."""
    if device.type != "cpu" or 0 in shape:
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = int(np.prod(shape)) * torch.empty(0, dtype=dtype).element_size()
    return _host_zeros(nbytes).view(dtype).view(shape)


def _host_zeros(nbytes: int) -> torch.Tensor:
    """``nbytes`` zero bytes (uint8), lazily backed; huge pages where the OS offers them."""
    try:
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    except (AttributeError, OSError, ValueError):  # no anonymous mmap here: calloc
        return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8))
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)
        except OSError:
            pass  # THP off: 4 KiB pages, as calloc's
    return torch.frombuffer(buf, dtype=torch.uint8)  # the tensor keeps the mapping alive


def _caches_values(attn) -> bool:
    """Whether an attention layer has a value cache beside its key cache (False: MLA's latent
    rows serve as both, ``layers/mla_attention.py``)."""
    return getattr(attn, "caches_values", True)
