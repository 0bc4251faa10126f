"""Chunked local attention (``layers/chunked_attention.py``) over the backends' paged kernels:
each query attends only the keys of its own ``attention_chunk_size`` chunk, up to itself.
Checked against dense attention with that mask on steps whose decodes and prefill chunks
(with cached context) cross chunk boundaries, for the reference, cpu and Triton kernels
(Triton on the GPU where there is one, else through its interpreter on the CPU); and a
captured decode step (no host lists) against the same step run eagerly."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from tessellm.backends.reference.attention import ReferenceAttentionKernel, gather_kv
from tessellm.backends.spec import AttentionSpec
from tessellm.layers.chunked_attention import ChunkedLocalKernel, local_batch
from tessellm.testing.harness import make_paged_step

BLOCK, CHUNK, KV_HEADS, GROUP, HEAD = 4, 8, 2, 2, 16
# decodes at positions 0, 7, 8, 23 (a chunk's last and first tokens), then prefill chunks:
# from scratch across two boundaries, after cached context inside a chunk and across one
QUERY_LENS = [1, 1, 1, 1, 19, 3, 13, 8]
CTX_LENS = [0, 7, 8, 23, 0, 9, 6, 16]


def chunked_oracle(step, chunk: int) -> torch.Tensor:
    """Dense float32 attention per sequence, key ``j`` visible to query position ``p`` when
    ``j <= p`` and ``j // chunk == p // chunk``."""
    b, out = step.batch, torch.empty_like(step.ref_out)
    for s in range(b.num_seqs):
        q0, q1, n = b.query_start_loc_host[s], b.query_start_loc_host[s + 1], b.seq_lens_host[s]
        k = gather_kv(step.ref_k_cache, b.block_tables[s].cpu(), n).float()
        v = gather_kv(step.ref_v_cache, b.block_tables[s].cpu(), n).float()
        k = k.repeat_interleave(GROUP, dim=1)
        v = v.repeat_interleave(GROUP, dim=1)
        q_pos = torch.arange(n - (q1 - q0), n)[:, None]
        k_pos = torch.arange(n)[None, :]
        mask = (k_pos <= q_pos) & (k_pos // chunk == q_pos // chunk)
        scores = torch.einsum("qhd,khd->hqk", step.q[q0:q1].float().cpu(), k) * step.scale
        probs = scores.masked_fill(~mask, -math.inf).softmax(-1)
        out[q0:q1] = torch.einsum("hqk,khd->qhd", probs, v)
    return out


def _kernels():
    spec = AttentionSpec(num_heads=KV_HEADS * GROUP, num_kv_heads=KV_HEADS, head_size=HEAD,
                         dtype=torch.float32, block_size=BLOCK)
    yield "reference", ReferenceAttentionKernel()
    from tessellm.backends.cpu.attention import CpuAttentionKernel

    yield "cpu", CpuAttentionKernel(spec)
    try:
        from tessellm.kernels.attention import TritonAttentionKernel
    except ImportError:
        return
    yield "triton", TritonAttentionKernel(spec, max_model_len=64, max_num_seqs=16)


KERNELS = dict(_kernels())


def _device(name: str) -> torch.device:
    """Where a kernel's inputs live: Triton's on the GPU when there is one (the interpreter
    takes CPU tensors), the reference and cpu kernels' on the CPU."""
    return torch.device("cuda" if name == "triton" and torch.cuda.is_available() else "cpu")


def _run(kernel, step, batch=None):
    k_cache, v_cache = step.k_cache.clone(), step.v_cache.clone()
    md = kernel.build_metadata(batch or step.batch)
    return kernel.forward(step.q.clone(), step.k, step.v, k_cache, v_cache, md, step.scale)


@pytest.mark.parametrize("name", list(KERNELS))
def test_chunked_attention_matches_masked_dense(name):
    step = make_paged_step(QUERY_LENS, CTX_LENS, num_kv_heads=KV_HEADS, group=GROUP,
                           head_size=HEAD, block_size=BLOCK, dtype=torch.float32,
                           device=_device(name), seed=5)
    got = _run(ChunkedLocalKernel(KERNELS[name], CHUNK, BLOCK), step).cpu()
    want = chunked_oracle(step, CHUNK)
    torch.testing.assert_close(got.float(), want, atol=2e-4, rtol=2e-4)
    assert not torch.allclose(step.ref_out, want, atol=1e-2)  # the chunk limit mattered


def test_virtual_sequences_of_a_step():
    """The split itself, drawn in the module docstring's picture (C 8, block 4)."""
    step = make_paged_step([7], [6], num_kv_heads=1, group=1, head_size=HEAD, block_size=BLOCK,
                           dtype=torch.float32, device=torch.device("cpu"))
    local = local_batch(step.batch, CHUNK, BLOCK)
    table = step.batch.block_tables[0]
    assert local.num_seqs == 2 and local.num_decodes == 0
    assert local.query_start_loc_host == [0, 2, 7] and local.seq_lens_host == [8, 5]
    assert local.block_tables[0, :2].tolist() == table[:2].tolist()
    assert local.block_tables[1, :2].tolist() == table[2:4].tolist()
    assert local.slot_mapping is step.batch.slot_mapping


@pytest.mark.parametrize("name", list(KERNELS))
def test_captured_decode_step_matches_eager(name):
    """A graph-captured decode step has no host lists: the device-only split gives the eager
    step's output."""
    step = make_paged_step([1] * 5, [0, 7, 8, 15, 22], num_kv_heads=KV_HEADS, group=GROUP,
                           head_size=HEAD, block_size=BLOCK, dtype=torch.float32,
                           device=_device(name), seed=7)
    kernel = ChunkedLocalKernel(KERNELS[name], CHUNK, BLOCK)
    captured = dataclasses.replace(step.batch, query_start_loc_host=[], seq_lens_host=[],
                                   max_seq_len=64)
    torch.testing.assert_close(_run(kernel, step, captured), _run(kernel, step), atol=2e-5,
                               rtol=2e-5)
    torch.testing.assert_close(_run(kernel, step).float().cpu(), chunked_oracle(step, CHUNK),
                               atol=2e-4, rtol=2e-4)


def test_chunk_not_a_block_multiple_refused():
    with pytest.raises(ValueError, match="multiple of the KV cache block_size 16"):
        ChunkedLocalKernel(ReferenceAttentionKernel(), 24, 16)


def test_captured_verify_step_refused():
    step = make_paged_step([2, 2], [5, 9], num_kv_heads=1, group=1, head_size=HEAD,
                           block_size=BLOCK, dtype=torch.float32, device=torch.device("cpu"))
    captured = dataclasses.replace(step.batch, query_start_loc_host=[], seq_lens_host=[])
    with pytest.raises(ValueError, match="speculative decoding"):
        local_batch(captured, CHUNK, BLOCK)
