"""The cpu backend's multi-head latent attention (``backends/cpu/mla_attention.py``) does the
work MLA needs and no more: each step's latent rows are written into the cache once (one write
op on the cache, not one as keys and another as values), and the value product runs over the
``mla_value_size`` value dims (512 of the released models' 576), which the FLOP count of a
decode step shows exactly. Its outputs against the oracle are the conformance suite's
(``testing/conformance/test_mla_attention.py``)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode

from tessellm.backends.cpu.mla_attention import CpuMLAAttentionKernel
from tessellm.backends.reference.mla_attention import paged_mla_attention
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step

HEADS, D, DV, BS = 2, 576, 512, 16


class CacheWrites(TorchDispatchMode):
    """The ops that write into the storage of one tensor."""

    def __init__(self, tensor):
        super().__init__()
        self.ptr = tensor.untyped_storage().data_ptr()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for i, arg in enumerate(func._schema.arguments):
            value = args[i] if i < len(args) else kwargs.get(arg.name)
            if (arg.alias_info is not None and arg.alias_info.is_write
                    and isinstance(value, torch.Tensor)
                    and value.untyped_storage().data_ptr() == self.ptr):
                self.ops.append(func)
        return func(*args, **kwargs)


def _step(q_lens, ctx, kv_cache_dtype="auto"):
    spec = AttentionSpec(num_heads=HEADS, num_kv_heads=1, head_size=D, dtype=torch.float32,
                         block_size=BS, max_model_len=256, max_num_seqs=8, mla_value_size=DV,
                         kv_cache_dtype=kv_cache_dtype)
    kernel = CpuMLAAttentionKernel(spec)
    step = make_paged_step(q_lens, ctx, num_kv_heads=1, group=HEADS, head_size=D, block_size=BS,
                           dtype=torch.float32, device="cpu", seed=11)
    return kernel, step


@pytest.mark.parametrize("q_lens, ctx", [([1, 1, 1], [5, 20, 40]), ([1, 9, 30], [12, 0, 21])],
                         ids=["decode", "mixed"])
def test_latent_rows_written_once(q_lens, ctx):
    kernel, step = _step(q_lens, ctx)
    md = kernel.build_metadata(step.batch)
    with CacheWrites(step.k_cache) as writes:
        out = kernel.forward(step.q, step.k, None, step.k_cache, None, md, step.scale)
    assert len(writes.ops) == 1, f"the cache was written by {writes.ops}"
    assert torch.equal(step.k_cache, step.ref_k_cache)
    b = step.batch
    want = paged_mla_attention(step.q, step.ref_k_cache, DV, b.query_start_loc, b.seq_lens,
                               b.block_tables, step.scale)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_values_span_the_value_dims_only():
    """One decode group of 3 sequences padded to 3 blocks: scores over D, values over Dv."""
    kernel, step = _step([1, 1, 1], [5, 20, 40])
    md = kernel.build_metadata(step.batch)
    with FlopCounterMode(display=False) as flops:
        kernel.forward(step.q, step.k, None, step.k_cache, None, md, step.scale)
    keys = 3 * BS  # the group's padded width: the longest context (41 keys) in whole blocks
    assert flops.get_total_flops() == 2 * 3 * HEADS * keys * (D + DV)


def test_fp8_rows_written_once_as_e4m3():
    kernel, step = _step([1, 4], [7, 30], kv_cache_dtype="fp8")
    assert kernel.kv_cache_torch_dtype == torch.float8_e4m3fn
    cache = step.k_cache.to(torch.float8_e4m3fn)
    md = kernel.build_metadata(step.batch)
    with CacheWrites(cache) as writes:
        kernel.forward(step.q, step.k, None, cache, None, md, step.scale)
    assert len(writes.ops) == 1
    slots = step.batch.slot_mapping
    rows = cache.view(-1, D)[slots]
    assert torch.equal(rows.float(), step.k[:, 0].to(torch.float8_e4m3fn).float())
