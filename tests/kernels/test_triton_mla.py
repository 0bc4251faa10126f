"""The Triton MLA kernels (``kernels/attention/mla.py``, ``mla_decode.py``) against the pure-torch
oracle (``backends/reference/mla_attention.py``), on a GPU when there is one, else through
Triton's interpreter at tiny sizes: split-KV decode batches of mixed context lengths (contexts
shorter than one split, ending inside a split, spanning several; one split writing the output
itself), prefill chunks over cached context (chunk boundaries mid-block, prefix hits) next to
decodes, heads not a multiple of the head block, and fp8 latent rows with a k_scale other than
1 (cache bytes equal to the oracle's rounding; output equal to the oracle's over those rows)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.mla_attention import (paged_mla_attention, quantize_latent,
                                                       write_latent_cache)
from tessellm.backends.spec import AttentionSpec
from tessellm.kernels.attention.mla import TritonMLAAttentionKernel
from tessellm.testing.harness import make_paged_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# (heads, latent row D, value width Dv, block size)
TINY, RELEASED = (20, 48, 32, 8), (4, 576, 512, 16)


def _kernel(shape, dtype, kv_cache_dtype="auto", min_partition=16):
    heads, d, dv, bs = shape
    spec = AttentionSpec(num_heads=heads, num_kv_heads=1, head_size=d, dtype=dtype,
                         block_size=bs, max_model_len=256, max_num_seqs=16, mla_value_size=dv,
                         kv_cache_dtype=kv_cache_dtype)
    kernel = TritonMLAAttentionKernel(spec)
    kernel.min_partition = min_partition  # several splits at these short contexts
    return kernel


def _run(kernel, shape, q_lens, ctx, dtype, k_scale=1.0, seed=0):
    heads, d, dv, bs = shape
    step = make_paged_step(q_lens, ctx, num_kv_heads=1, group=heads, head_size=d, block_size=bs,
                           dtype=dtype, device=DEVICE, seed=seed)
    b = step.batch
    fp8 = kernel.kv_cache_torch_dtype is not None
    cache, ref = step.k_cache, step.ref_k_cache.float()
    if fp8:
        kernel.k_scale = k_scale
        context = quantize_latent(step.k_cache.cpu().float() / k_scale, torch.float8_e4m3fn)
        cache, ref = context.to(DEVICE, copy=True), context
        write_latent_cache(step.k.cpu(), ref, b.slot_mapping.cpu(), k_scale)
    md = kernel.build_metadata(b)
    out = kernel.forward(step.q, step.k, None, cache, None, md, step.scale)
    want = paged_mla_attention(step.q.cpu().float(), ref, dv, b.query_start_loc.cpu(),
                               b.seq_lens.cpu(), b.block_tables.cpu(), step.scale, k_scale)
    got_cache = cache.cpu()
    if fp8:
        assert torch.equal(got_cache.view(torch.uint8), ref.view(torch.uint8))
    else:
        assert torch.equal(got_cache.float(), ref)
    return md, out.float().cpu(), want


@pytest.mark.parametrize("shape", [TINY, RELEASED], ids=["tiny", "576-512"])
@pytest.mark.parametrize("q_lens, ctx, decodes", [
    ([1] * 6, [0, 5, 15, 16, 47, 100], 6),  # one key; within a split; on, past, across splits
    ([1, 1, 7, 16, 3], [30, 2, 0, 13, 40], 2),  # decodes + a fresh chunk + chunks over prefixes
], ids=["decodes", "mixed"])
def test_mla_matches_reference(shape, q_lens, ctx, decodes):
    kernel = _kernel(shape, torch.float32)
    md, out, want = _run(kernel, shape, q_lens, ctx, torch.float32)
    assert md.num_decodes == decodes and md.num_splits > 1
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_split_decode_uses_several_splits_and_one():
    """The split count follows the batch: several at a small batch (the reduce kernel), one at
    a large one (the split kernel writes the output); both give the oracle's output."""
    many = _kernel(TINY, torch.float32)
    assert many.num_splits(2) > 1
    md, out, want = _run(many, TINY, [1, 1], [90, 33], torch.float32, seed=1)
    assert md.num_splits > 1
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)
    one = _kernel(TINY, torch.float32)
    one.target_programs = 1
    md, out, want = _run(one, TINY, [1, 1], [90, 33], torch.float32, seed=1)
    assert md.num_splits == 1
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


@pytest.mark.parametrize("k_scale", [1.0, 0.25])
@pytest.mark.parametrize("shape", [TINY, RELEASED], ids=["tiny", "576-512"])
def test_mla_fp8_latent_rows(shape, k_scale):
    kernel = _kernel(shape, torch.float32, kv_cache_dtype="fp8")
    assert kernel.kv_cache_torch_dtype == torch.float8_e4m3fn
    _, out, want = _run(kernel, shape, [1, 1, 1, 5, 12], [40, 3, 17, 20, 0], torch.float32,
                        k_scale=k_scale, seed=2)
    torch.testing.assert_close(out, want, atol=2e-4, rtol=2e-4)


def test_mla_bfloat16():
    kernel = _kernel(RELEASED, torch.bfloat16)
    _, out, want = _run(kernel, RELEASED, [1, 1, 9], [20, 60, 7], torch.bfloat16, seed=3)
    torch.testing.assert_close(out, want, atol=2e-2, rtol=2e-2)
