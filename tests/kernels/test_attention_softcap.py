"""Attention logit soft-capping (``AttentionSpec.logit_softcap``) in the Triton paged kernels,
against the pure-torch reference (``backends/reference/attention.paged_attention``).

Every path of ``TritonAttentionKernel.forward`` that computes scores is covered: the varlen
prefill kernel (chunks over cached context), the split-KV decode (one split writing the output
itself, several through the reduce kernel, the small-batch prefetch), the decode with rotary and
cache write fused in (``_new_key``), the split-KV verify step, and an fp8 cache. Caps are small
(1 to 5) against scores of magnitude ~1-4, so dropping the cap fails every case (checked by
``_capped_differs``). GPU at these sizes too, or Triton's interpreter on the CPU (conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.attention import paged_attention, softcap, write_kv_cache  # noqa: E402
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.kernels.attention import TritonAttentionKernel  # noqa: E402
from tessellm.layers.rotary import cos_sin_cache  # noqa: E402
from tessellm.testing.harness import make_paged_step, rotate_step  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
F32 = torch.float32
KVH, GROUP, HEAD, BS = 2, 2, 32, 8
TOL = dict(atol=2e-4, rtol=2e-4)


def _kernel(cap, window=None, kv_cache_dtype="auto", dtype=F32) -> TritonAttentionKernel:
    spec = AttentionSpec(num_heads=KVH * GROUP, num_kv_heads=KVH, head_size=HEAD, dtype=dtype,
                         block_size=BS, kv_cache_dtype=kv_cache_dtype, sliding_window=window,
                         logit_softcap=cap)
    return TritonAttentionKernel(spec, max_model_len=256, max_num_seqs=16)


def _step(q_lens, ctx, cap, window=None, seed=0, q_gain=2.0):
    """A random step; q scaled by ``q_gain`` so scores reach a few units (the cap matters)."""
    return make_paged_step(q_lens, ctx, num_kv_heads=KVH, group=GROUP, head_size=HEAD,
                           block_size=BS, dtype=F32, device=DEVICE, window=window, seed=seed,
                           logit_softcap=cap, q_gain=q_gain)


def _reference(step, cap, window, k_cache=None, v_cache=None):
    b = step.batch
    return paged_attention(step.q.float().cpu(), step.ref_k_cache if k_cache is None else k_cache,
                           step.ref_v_cache if v_cache is None else v_cache,
                           b.query_start_loc.cpu(), b.seq_lens.cpu(), b.block_tables.cpu(),
                           step.scale, window, cap)


def _capped_differs(step, cap, window, got):
    """The test could fail: without the cap the output is far from what the kernel gave."""
    uncapped = _reference(step, None, window)
    assert (uncapped - got.float().cpu()).abs().max() > 50 * TOL["atol"], \
        f"cap {cap} does not change this step's output; the case proves nothing"


def test_softcap_is_cap_times_tanh():
    s = torch.tensor([-1e30, -30.0, -0.5, 0.0, 1e-3, 2.0, 1e30])
    torch.testing.assert_close(softcap(s, 5.0), 5.0 * torch.tanh(s / 5.0))
    assert softcap(s, None) is s


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("cap", [1.0, 5.0])
def test_mixed_batch_prefill_and_decode(cap, window):
    # decodes (split-KV, prefetch: a small batch), then prefill chunks over cached context
    step = _step([1, 1, 1, 9, 13, 3], [0, 17, 40, 0, 11, 30], cap, window, seed=int(cap) + 7)
    kernel = _kernel(cap, window)
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(step.batch), step.scale)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)
    _capped_differs(step, cap, window, out)


@pytest.mark.parametrize("prefetch_max", [0, 16])
def test_decode_several_splits_and_reduce(prefetch_max):
    """Long contexts: several splits, combined by the reduce kernel; with and without the
    small-batch prefetch of the first tile."""
    cap = 2.0
    step = _step([1, 1, 1], [150, 70, 3], cap, seed=3)
    kernel = _kernel(cap)
    kernel.prefetch_max_decodes = prefetch_max
    kernel.small_batch_min_partition = kernel.min_partition = 32
    md = kernel.build_metadata(step.batch)
    assert md.num_splits > 1
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)
    _capped_differs(step, cap, None, out)


def test_decode_with_fused_rotary_and_cache_write():
    """A pure-decode step with rotary inputs: the split kernel rotates, writes and scores the new
    key from registers (``_new_key``), capped like every cached key."""
    cap = 1.5
    q_lens, ctx = [1, 1, 1, 1], [0, 9, 30, 64]
    step = _step(q_lens, ctx, cap, seed=11)
    positions = torch.tensor(ctx, dtype=torch.int64)
    cos_sin = cos_sin_cache(HEAD, 128, 10000.0, None)
    q_rot, ref_k, ref_v = rotate_step(step, positions, cos_sin)
    want = _reference(dataclasses.replace(step, q=q_rot), cap, None, ref_k, ref_v)
    kernel = _kernel(cap)
    md = kernel.build_metadata(step.batch)
    assert kernel._fuses_decode_rotary(step.q, step.k_cache, md, cos_sin)
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         positions=positions.to(DEVICE), cos_sin_cache=cos_sin.to(DEVICE))
    torch.testing.assert_close(out.cpu(), want, **TOL)


def test_verify_step_through_split_kv():
    """Speculative verify (every sequence 3 queries, a captured step: no host lists) takes the
    split-KV kernel with QUERY_LEN 3; causal among its queries, capped."""
    cap = 2.0
    step = _step([3, 3, 3], [12, 40, 5], cap, seed=5)
    batch = dataclasses.replace(step.batch, num_decodes=0, query_start_loc_host=[],
                                seq_lens_host=[])
    kernel = _kernel(cap)
    assert kernel.verify_query_len(batch) == 3
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(batch), step.scale)
    torch.testing.assert_close(out.cpu(), step.ref_out, **TOL)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton's interpreter writes e4m3 "
                    "wrongly (reshape_and_cache: values off by up to 1.0 against torch's cast, "
                    "with or without a cap); fp8 caches are tested on a GPU")
def test_fp8_cache():
    """An e4m3 cache: the cap applies to the scores with the cache's scale folded in."""
    fp8 = torch.float8_e4m3fn
    cap = 2.0
    step = _step([1, 1, 6], [20, 3, 9], cap, seed=9)
    k8, v8 = step.k_cache.to(fp8), step.v_cache.to(fp8)
    kernel = _kernel(cap, kv_cache_dtype="fp8")
    kernel.k_scale, kernel.v_scale = 0.5, 2.0
    ref_k, ref_v = k8.float().cpu() * 0.5, v8.float().cpu() * 2.0
    new_k = (step.k.cpu() / 0.5).to(fp8).float() * 0.5
    new_v = (step.v.cpu() / 2.0).to(fp8).float() * 2.0
    write_kv_cache(new_k, new_v, ref_k, ref_v, step.batch.slot_mapping.cpu())
    out = kernel.forward(step.q, step.k, step.v, k8, v8, kernel.build_metadata(step.batch),
                         step.scale)
    want = _reference(step, cap, None, ref_k, ref_v)
    torch.testing.assert_close(out.cpu(), want, atol=2e-3, rtol=2e-3)


def test_subclass_with_its_own_forward_does_not_claim_softcap():
    """A plugin's subclass that replaces forward must pass the cap on itself: it inherits no
    claim (the engine then refuses soft-capped models on it)."""

    class Mine(TritonAttentionKernel):
        def forward(self, q, k, v, k_cache, v_cache, metadata, scale):
            raise NotImplementedError

    assert TritonAttentionKernel.supports_logit_softcap is True
    assert Mine.supports_logit_softcap is False


def test_bad_cap_is_refused():
    step = _step([4], [0], None, seed=1)
    kernel = _kernel(-1.0)
    with pytest.raises(ValueError, match="logit_softcap must be a positive number"):
        kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                       kernel.build_metadata(step.batch), step.scale)
