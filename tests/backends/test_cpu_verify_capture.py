"""The cpu kernel's captured verify step (speculative decoding under TESSELLM_CPU_COMPILE=1):
a batch with no host lists and q query tokens per sequence (as ``spec_decode/verify_graphs.py``
builds it) attends like the reference, padding sequences write nothing, and the step compiles
and runs under ``torch.compile`` (start-up used to crash on the empty ``query_start_loc_host``)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tessellm.backends.cpu.attention import CpuAttentionKernel
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step

BLOCK = 4


def _captured(step, q: int, pad: int):
    """The step as a captured verify graph sees it: no host lists, ``pad`` padding sequences
    (slot -1, length q), the block table's full width."""
    b = step.batch
    s = b.num_seqs
    table = torch.cat([b.block_tables, torch.zeros(pad, b.block_tables.shape[1], dtype=torch.int32)])
    return dataclasses.replace(
        b, num_tokens=(s + pad) * q, num_seqs=s + pad, num_decodes=0,
        query_start_loc=torch.arange(s + pad + 1, dtype=torch.int32) * q,
        seq_lens=torch.cat([b.seq_lens, torch.full((pad,), q, dtype=torch.int32)]),
        block_tables=table, slot_mapping=torch.cat([b.slot_mapping, torch.full((pad * q,), -1)]),
        query_start_loc_host=[], seq_lens_host=[])


@pytest.mark.parametrize("window", [None, 5])
def test_captured_verify_matches_reference(window):
    q = 3
    step = make_paged_step([q, q, q], [6, 1, 13], num_kv_heads=2, group=2, head_size=16,
                           block_size=BLOCK, dtype=torch.float32, device="cpu", window=window, seed=3)
    kernel = CpuAttentionKernel(AttentionSpec(4, 2, 16, torch.float32, BLOCK, "auto", window))
    pad = 2
    batch = _captured(step, q, pad)
    qx = torch.cat([step.q, torch.randn(pad * q, *step.q.shape[1:])])
    kx = torch.cat([step.k, torch.randn(pad * q, *step.k.shape[1:])])
    vx = torch.cat([step.v, torch.randn(pad * q, *step.v.shape[1:])])
    out = kernel.forward(qx, kx, vx, step.k_cache, step.v_cache, kernel.build_metadata(batch), step.scale)
    n = step.q.shape[0]
    torch.testing.assert_close(out[:n], step.ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(step.k_cache, step.ref_k_cache) and torch.equal(step.v_cache, step.ref_v_cache)


@pytest.mark.slow  # ~40 s of inductor on two cores
def test_captured_verify_compiles():
    q = 2
    step = make_paged_step([q, q], [5, 9], num_kv_heads=2, group=2, head_size=16, block_size=BLOCK,
                           dtype=torch.float32, device="cpu", seed=4)
    kernel = CpuAttentionKernel(AttentionSpec(4, 2, 16, torch.float32, BLOCK))
    batch = _captured(step, q, 0)

    def run(qx, kx, vx, seq_lens, slots, table):
        b = dataclasses.replace(batch, seq_lens=seq_lens, slot_mapping=slots, block_tables=table)
        return kernel.forward(qx, kx, vx, step.k_cache, step.v_cache, kernel.build_metadata(b), step.scale)

    out = torch.compile(run, fullgraph=True)(step.q, step.k, step.v, batch.seq_lens, batch.slot_mapping,
                                              batch.block_tables)
    torch.testing.assert_close(out, step.ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("query_lens,ctx_lens", [
    ([1, 1, 4, 4, 4], [7, 2, 9, 0, 13]),  # decodes, then verifies of k = 3 (one a fresh prompt)
    ([1, 3, 1 + 1, 6, 2], [5, 11, 0, 4, 17]),  # uneven query lengths: padded rows dropped
    ([5], [20]),  # one verify, no decode
])
def test_eager_short_queries_batched_match_reference(window, query_lens, ctx_lens):
    """An eager step whose non-decode sequences have few queries each (a verify step) runs them
    as one SDPA (``ShortQueries``): the same output as the reference, the cache written alike."""
    from tessellm.backends.cpu import attention

    decodes = sum(1 for n in query_lens if n == 1)
    order = sorted(range(len(query_lens)), key=lambda i: query_lens[i] != 1)  # decodes first
    qs, cs = [query_lens[i] for i in order], [ctx_lens[i] for i in order]
    step = make_paged_step(qs, cs, num_kv_heads=2, group=2, head_size=16, block_size=BLOCK,
                           dtype=torch.float32, device="cpu", window=window, seed=5)
    assert step.batch.num_decodes == decodes
    kernel = CpuAttentionKernel(AttentionSpec(4, 2, 16, torch.float32, BLOCK, "auto", window))
    md = kernel.build_metadata(step.batch)
    assert md.short is not None and md.short.n == max(qs[decodes:])
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale)
    torch.testing.assert_close(out, step.ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(step.k_cache, step.ref_k_cache) and torch.equal(step.v_cache, step.ref_v_cache)
    long = make_paged_step([1, attention.SHORT_QUERY + 1], [3, 2], num_kv_heads=2, group=2, head_size=16,
                           block_size=BLOCK, dtype=torch.float32, device="cpu", seed=6)
    assert kernel.build_metadata(long.batch).short is None  # a long chunk: one SDPA per sequence
