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


def test_split_decode_with_32_heads_a_program():
    """A head block wider than the heads (20 of 32 rows real): the masked rows stay out."""
    kernel = _kernel(TINY, torch.float32)
    kernel.block_h = 32
    _, out, want = _run(kernel, TINY, [1, 1, 1], [70, 8, 31], torch.float32, seed=6)
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


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_expanded_prefill_equals_absorbed(kv_cache_dtype):
    """Long chunks in the expanded form (``mla_prefill.py``: keys ``[W_UK c | k_pe]`` and
    values ``W_UV c`` per head, decompressed from the cached rows) give the absorbed oracle's
    output times W_UV; the decodes of the same step stay absorbed. Chunks over prefixes whose
    boundaries fall mid-block, and one fresh prompt."""
    heads, nope, rope, v_dim, c, bs = 4, 16, 8, 16, 32, 8
    shape = (heads, c + rope, c, bs)
    kernel = _kernel(shape, torch.float32, kv_cache_dtype)
    kernel.expanded_min_query = 6
    q_lens, ctx = [1, 1, 7, 12, 3], [9, 30, 0, 21, 13]
    step = make_paged_step(q_lens, ctx, num_kv_heads=1, group=heads, head_size=c + rope,
                           block_size=bs, dtype=torch.float32, device=DEVICE, seed=4)
    gen = torch.Generator().manual_seed(5)
    w_uk = torch.randn(heads, nope, c, generator=gen) / c ** 0.5
    w_uv = torch.randn(heads, v_dim, c, generator=gen) / c ** 0.5
    t = step.q.shape[0]
    q_nope = torch.randn(t, heads, nope, generator=gen)
    q_pe = torch.randn(t, heads, rope, generator=gen)
    q_abs = torch.cat((torch.einsum("thn,hnc->thc", q_nope, w_uk), q_pe), dim=-1)
    b, cache, ref = step.batch, step.k_cache, step.ref_k_cache.float()
    if kv_cache_dtype == "fp8":
        context = quantize_latent(step.k_cache.cpu().float(), torch.float8_e4m3fn)
        cache, ref = context.to(DEVICE, copy=True), context
        write_latent_cache(step.k.cpu(), ref, b.slot_mapping.cpu())
    want = paged_mla_attention(q_abs, ref, c, b.query_start_loc.cpu(), b.seq_lens.cpu(),
                               b.block_tables.cpu(), step.scale)
    want = torch.einsum("thc,hvc->thv", want, w_uv)

    md = kernel.build_metadata(b)
    assert md.expanded is not None and md.expanded.num_decode_tokens == 2
    dev = lambda x: x.to(DEVICE)  # noqa: E731
    out_d = kernel.forward(dev(q_abs[:2]), step.k, None, cache, None, md, step.scale)
    rows = kernel.context_rows(cache, md, torch.float32)
    assert rows.shape == (sum(c0 + q for c0, q in zip(ctx[2:], q_lens[2:])), c + rope)
    k_nope = torch.einsum("kc,hnc->khn", rows[:, :c], dev(w_uk))
    values = torch.einsum("kc,hvc->khv", rows[:, :c], dev(w_uv))
    q_exp = dev(torch.cat((q_nope, q_pe), dim=-1)[2:])
    out_p = kernel.forward_expanded(q_exp, k_nope, rows[:, c:], values, md, step.scale)
    got = torch.cat((torch.einsum("thc,hvc->thv", out_d.cpu(), w_uv), out_p.cpu()))
    torch.testing.assert_close(got, want, atol=2e-4, rtol=2e-4)


def test_short_chunks_and_long_contexts_stay_absorbed():
    """Chunks under ``expanded_min_query`` queries, and contexts whose decompressed keys would
    pass ``expanded_max_key_heads``, run absorbed."""
    kernel = _kernel(TINY, torch.float32)
    step = make_paged_step([1, 5], [4, 9], num_kv_heads=1, group=TINY[0], head_size=TINY[1],
                           block_size=TINY[3], dtype=torch.float32, device=DEVICE)
    assert kernel.build_metadata(step.batch).expanded is None  # 5 < expanded_min_query
    kernel.expanded_min_query = 5
    assert kernel.build_metadata(step.batch).expanded is not None
    kernel.expanded_max_key_heads = 14 * TINY[0] - 1  # 14 context keys x 20 heads
    assert kernel.build_metadata(step.batch).expanded is None
