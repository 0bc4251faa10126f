"""Attention sinks (``AttentionSpec.attention_sinks``, gpt-oss) in the Triton paged kernels,
against the pure-torch reference (``backends/reference/attention.paged_attention``'s ``sinks``).

The sink joins each row's softmax once, after its keys (``common._join_sinks``): in the prefill
kernel, in the split-KV decode when one split writes the output itself, and in the reduce kernel
when several splits are combined (never per split: that would count it once per split). Each
path is covered: prefill chunks over cached context (with a window smaller than the context),
one-split decodes, several splits through the reduce kernel (with and without the small-batch
prefetch), the decode with fused rotary, and the split-KV verify step. Sinks of -1 to 5 against
scores of magnitude ~1 change every output (``_sinks_matter``). GPU at these sizes too, or
Triton's interpreter on the CPU (conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.attention import (paged_attention, softmax_with_sinks,  # noqa: E402
                                                   write_kv_cache)
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.kernels.attention import TritonAttentionKernel  # noqa: E402
from tessellm.layers.rotary import cos_sin_cache  # noqa: E402
from tessellm.testing.harness import make_paged_step, rotate_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32
KVH, GROUP, HEAD, BS = 2, 2, 32, 8
TOL = dict(atol=2e-4, rtol=2e-4)
SINKS = torch.tensor([-1.0, 2.0, 0.5, 5.0])  # one per query head, KVH * GROUP


def _kernel(window=None, sinks=True, kv_cache_dtype="auto", dtype=F32) -> TritonAttentionKernel:
    spec = AttentionSpec(num_heads=KVH * GROUP, num_kv_heads=KVH, head_size=HEAD, dtype=dtype,
                         block_size=BS, kv_cache_dtype=kv_cache_dtype, sliding_window=window,
                         attention_sinks=sinks)
    return TritonAttentionKernel(spec, max_model_len=256, max_num_seqs=16)


def _step(q_lens, ctx, window=None, seed=0, dtype=F32):
    return make_paged_step(q_lens, ctx, num_kv_heads=KVH, group=GROUP, head_size=HEAD,
                           block_size=BS, dtype=dtype, device=DEVICE, window=window, seed=seed,
                           sinks=SINKS)


def _forward(kernel, step, batch=None, **kw):
    batch = step.batch if batch is None else batch
    return kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                          kernel.build_metadata(batch), step.scale, sinks=step.sinks, **kw)


def _sinks_matter(step, window, got):
    """The case could fail: without the sinks the output is far from what the kernel gave."""
    b = step.batch
    plain = paged_attention(step.q.float().cpu(), step.ref_k_cache, step.ref_v_cache,
                            b.query_start_loc.cpu(), b.seq_lens.cpu(), b.block_tables.cpu(),
                            step.scale, window)
    assert (plain - got.float().cpu()).abs().max() > 50 * TOL["atol"], \
        "the sinks do not change this step's output; the case proves nothing"


def test_softmax_with_sinks_is_hf_concat_and_drop():
    """The reference: HF gpt-oss's eager attention (concat the sink column, softmax, drop it)."""
    scores = torch.randn(4, 3, 7)
    scores[0, 0, 3:] = float("-inf")
    sinks = torch.randn(4)
    combined = torch.cat([scores, sinks.view(4, 1, 1).expand(4, 3, 1)], dim=-1)
    want = torch.softmax(combined - combined.amax(-1, keepdim=True), dim=-1)[..., :-1]
    got = softmax_with_sinks(scores, sinks.view(4, 1, 1))
    torch.testing.assert_close(got, want)
    assert float(got.sum(-1).max()) < 1.0  # the sink takes its share of every row
    torch.testing.assert_close(softmax_with_sinks(scores, None), torch.softmax(scores, -1))


@pytest.mark.parametrize("window", [None, 5])
def test_mixed_batch_prefill_and_decode(window):
    # one-split decodes (the split writes the output), then prefill chunks over cached context
    step = _step([1, 1, 1, 9, 13, 3], [0, 17, 40, 0, 11, 30], window, seed=7)
    kernel = _kernel(window)
    kernel.small_batch_max_splits = 1
    assert kernel.build_metadata(step.batch).num_splits == 1
    out = _forward(kernel, step)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)
    _sinks_matter(step, window, out)


@pytest.mark.parametrize("prefetch_max", [0, 16])
def test_decode_several_splits_join_the_sink_once(prefetch_max):
    """Long contexts: several splits combined by the reduce kernel, which joins the sink once
    per row; with and without the small-batch prefetch of the first tile."""
    step = _step([1, 1, 1], [150, 70, 3], seed=3)
    kernel = _kernel()
    kernel.prefetch_max_decodes = prefetch_max
    kernel.small_batch_min_partition = kernel.min_partition = 32
    md = kernel.build_metadata(step.batch)
    assert md.num_splits > 1
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         sinks=step.sinks)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)
    _sinks_matter(step, None, out)


def test_one_split_through_the_reduce_kernel():
    """``fused_reduce`` off: one split's partial goes through the reduce kernel, which joins the
    sink (the split must not have joined it too)."""
    step = _step([1, 1], [20, 5], seed=4)
    kernel = _kernel()
    kernel.fused_reduce = False
    out = _forward(kernel, step)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)


def test_decode_with_fused_rotary_and_cache_write():
    """A pure-decode step with rotary inputs (``_new_key`` scores the new key from registers);
    the sink joins after it like after every cached key."""
    q_lens, ctx = [1, 1, 1, 1], [0, 9, 30, 64]
    step = _step(q_lens, ctx, seed=11)
    positions = torch.tensor(ctx, dtype=torch.int64)
    cos_sin = cos_sin_cache(HEAD, 128, 10000.0, None)
    q_rot, ref_k, ref_v = rotate_step(step, positions, cos_sin)
    b = step.batch
    want = paged_attention(q_rot, ref_k, ref_v, b.query_start_loc.cpu(),
                           b.seq_lens.cpu(), b.block_tables.cpu(), step.scale, None, None, SINKS)
    kernel = _kernel()
    md = kernel.build_metadata(step.batch)
    assert kernel._fuses_decode_rotary(step.q, step.k_cache, md, cos_sin)
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         positions=positions.to(DEVICE), cos_sin_cache=cos_sin.to(DEVICE),
                         sinks=step.sinks)
    torch.testing.assert_close(out.cpu(), want, **TOL)


@pytest.mark.parametrize("window", [None, 6])
def test_verify_step_through_split_kv(window):
    """Speculative verify (every sequence 3 queries, a captured step: no host lists) takes the
    split-KV kernel with QUERY_LEN 3; causal among its queries, with sinks."""
    step = _step([3, 3, 3], [12, 40, 5], window, seed=5)
    batch = dataclasses.replace(step.batch, num_decodes=0, query_start_loc_host=[],
                                seq_lens_host=[])
    kernel = _kernel(window)
    assert kernel.verify_query_len(batch) == 3
    out = _forward(kernel, step, batch)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)
    _sinks_matter(step, window, out)


def test_bfloat16_prefill_and_split_decode():
    """bf16 q/k/v and cache (float32 sinks): prefill chunks and several decode splits."""
    step = _step([1, 1, 9, 5], [150, 3, 0, 20], seed=12, dtype=torch.bfloat16)
    kernel = _kernel(dtype=torch.bfloat16)
    kernel.small_batch_min_partition = kernel.min_partition = 32
    md = kernel.build_metadata(step.batch)
    assert md.num_splits > 1
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         sinks=step.sinks)
    torch.testing.assert_close(out.float().cpu(), step.ref_out.float(), atol=2e-2, rtol=2e-2)
    _sinks_matter(step, None, out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter writes e4m3 "
                    "wrongly (see test_attention_softcap.test_fp8_cache); fp8 caches are tested on "
                    "a GPU")
def test_fp8_cache():
    """An e4m3 cache with scales: the sink joins scores that carry the cache's k scale, in the
    same log2 units (bf16 q, so the fp16 dots on widened tiles where the GPU has them)."""
    fp8 = torch.float8_e4m3fn
    step = _step([1, 1, 6], [20, 3, 9], seed=9, dtype=torch.bfloat16)
    k8, v8 = step.k_cache.to(fp8), step.v_cache.to(fp8)
    kernel = _kernel(kv_cache_dtype="fp8", dtype=torch.bfloat16)
    kernel.k_scale, kernel.v_scale = 0.5, 2.0
    ref_k, ref_v = k8.float().cpu() * 0.5, v8.float().cpu() * 2.0
    new_k = (step.k.float().cpu() / 0.5).to(fp8).float() * 0.5
    new_v = (step.v.float().cpu() / 2.0).to(fp8).float() * 2.0
    write_kv_cache(new_k, new_v, ref_k, ref_v, step.batch.slot_mapping.cpu())
    out = kernel.forward(step.q, step.k, step.v, k8, v8, kernel.build_metadata(step.batch),
                         step.scale, sinks=step.sinks)
    b = step.batch
    want = paged_attention(step.q.float().cpu(), ref_k, ref_v, b.query_start_loc.cpu(),
                           b.seq_lens.cpu(), b.block_tables.cpu(), step.scale, None, None, SINKS)
    torch.testing.assert_close(out.float().cpu(), want, atol=3e-2, rtol=3e-2)


def test_subclass_with_its_own_forward_does_not_claim_sinks():
    """A plugin's subclass that replaces forward must pass the sinks on itself: it inherits no
    claim (the engine then refuses models with sinks on it)."""

    class Mine(TritonAttentionKernel):
        def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
            raise NotImplementedError

    assert TritonAttentionKernel.supports_attention_sinks is True
    assert Mine.supports_attention_sinks is False
