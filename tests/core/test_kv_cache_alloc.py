"""The host KV cache allocation (``runner_kv_cache._zeros``): zeros, lazily backed, huge pages."""

from __future__ import annotations

import gc
import os

import pytest
import torch

from tessellm.core.runner_kv_cache import _zeros


def test_host_cache_is_zeroed_independent_and_outlives_its_mapping():
    a = _zeros((64, 16, 3, 64), torch.float32, torch.device("cpu"))
    b = _zeros((64, 16, 3, 64), torch.float32, torch.device("cpu"))
    gc.collect()  # nothing but the tensors holds the mappings
    assert a.shape == (64, 16, 3, 64) and a.dtype == torch.float32 and a.is_contiguous()
    assert not a.any() and not b.any()
    a.view(-1, 3, 64).index_copy_(0, torch.tensor([5, 700]), torch.ones(2, 3, 64))
    assert a.sum() == 2 * 3 * 64 and not b.any()  # two allocations never share pages
    assert _zeros((4, 8), torch.bfloat16, torch.device("cpu")).dtype == torch.bfloat16


def _thp_mode() -> str:
    try:
        text = open("/sys/kernel/mm/transparent_hugepage/enabled").read()
    except OSError:
        return "unknown"
    return text.split("[")[1].split("]")[0]


@pytest.mark.skipif(_thp_mode() not in ("always", "madvise"), reason="no transparent huge pages")
def test_host_cache_is_backed_by_huge_pages():
    """A first write faults in 2 MiB pages (the 4 KiB faults of calloc'd memory took ~25x the
    warm time of a decode step's cache writes on 2 cores)."""
    t = _zeros((8 << 20,), torch.uint8, torch.device("cpu"))
    t.fill_(1)
    start = t.data_ptr()
    huge_kb = None
    with open(f"/proc/{os.getpid()}/smaps") as f:
        inside = False
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= start < hi
            elif inside and line.startswith("AnonHugePages:"):
                huge_kb = int(line.split()[1])
                break
    assert huge_kb is not None and huge_kb >= 2048, huge_kb
