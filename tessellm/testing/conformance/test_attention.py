"""The backend's paged-attention kernel against the pure-torch reference, over many shapes.

Checks per case: the output matches the reference (float32 reference, per-dtype tolerance),
the new k/v landed in exactly their slots, every other cache entry is untouched, and the
output has q's shape and dtype.
"""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import AttentionKernel, AttentionSpec
from tessellm.testing.harness import make_paged_step, seed_of, tolerance

# (num_kv_heads, group, head_size, block_size)
SHAPES = [(2, 1, 64, 16), (2, 4, 64, 16), (1, 8, 128, 16), (4, 2, 32, 8), (2, 2, 64, 32),
          (8, 1, 16, 16)]
# name -> (query_lens, ctx_lens); decodes first, context not a multiple of the block size
BATCHES = {
    "decode": ([1, 1, 1, 1], [0, 5, 17, 40]),
    "prefill": ([7, 16, 1], [0, 0, 0]),
    "mixed": ([1, 1, 9, 4, 20], [12, 40, 0, 21, 3]),
    # Speculative decoding's verify step: a few query tokens (last token + k drafts) per sequence
    # over a long cached context, next to plain decodes (tessellm.spec_decode).
    "verify": ([1, 4, 4, 2, 8], [30, 12, 47, 63, 100]),
}


def _kernel(target, spec):
    kernel = target.registry.attention_kernel(target.backend, spec)
    assert kernel is not None, (f"backend {target.name!r} provides no attention kernel for "
                                f"{spec}; every backend must serve this common shape")
    assert isinstance(kernel, AttentionKernel)
    return kernel


def _kernel_declaring(target, spec, flag: str, capability: str, missing: str):
    """The kernel ``target`` serves ``spec`` with, when it declares the optional feature
    ``flag``; skipped with ``missing`` when it does not (the engine refuses such models there),
    failed when the backend's capabilities claim ``capability`` all the same."""
    kernel = target.registry.attention_kernel(target.backend, spec)
    if kernel is None or not getattr(kernel, flag, False):
        if target.backend.capabilities.get(capability):
            pytest.fail(f"{target.name} declares {capability} but its kernel for such a spec "
                        f"does not declare {flag}")
        pytest.skip(f"{target.name} has no {missing}")
    return kernel


def _check(target, kernel, step, dtype):
    md = kernel.build_metadata(step.batch)
    extra = {} if step.sinks is None else {"sinks": step.sinks}
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         **extra)
    assert out.shape == step.q.shape and out.dtype == step.q.dtype
    torch.testing.assert_close(out.float().cpu(), step.ref_out.float(), **tolerance(dtype))
    # Cache writes are copies: exact, and nothing else changes.
    assert torch.equal(step.k_cache.cpu(), step.ref_k_cache), "k_cache differs from reference"
    assert torch.equal(step.v_cache.cpu(), step.ref_v_cache), "v_cache differs from reference"


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "kvh{}-g{}-d{}-bs{}".format(*s))
def test_attention_matches_reference_float32(target, shape, batch):
    kvh, group, head_size, block_size = shape
    spec = AttentionSpec(num_heads=kvh * group, num_kv_heads=kvh, head_size=head_size,
                         dtype=torch.float32, block_size=block_size, max_model_len=256,
                         max_num_seqs=8)
    q_lens, ctx = BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=kvh, group=group, head_size=head_size,
                           block_size=block_size, dtype=torch.float32, device=target.device,
                           seed=seed_of(shape, batch))
    _check(target, _kernel(target, spec), step, torch.float32)


@pytest.mark.parametrize("batch", ["decode", "mixed", "verify"])
def test_attention_matches_reference_low_precision(target, batch):
    dtype = target.low_precision_dtype
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=dtype, block_size=16,
                         max_model_len=256, max_num_seqs=8)
    q_lens, ctx = BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=4, head_size=64, block_size=16,
                           dtype=dtype, device=target.device, seed=seed_of("lp", batch))
    _check(target, _kernel(target, spec), step, dtype)


@pytest.mark.parametrize("window", [1, 6, 16])
def test_attention_sliding_window(target, window):
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, sliding_window=window, max_model_len=256, max_num_seqs=8)
    kernel = target.registry.attention_kernel(target.backend, spec)
    if kernel is None:
        if target.backend.capabilities.get("sliding_window"):
            pytest.fail(f"{target.name} declares sliding_window but returned no kernel for it")
        pytest.skip(f"{target.name} has no sliding-window kernel")
    assert kernel.supports_sliding_window, "a kernel served for a window must declare support"
    q_lens, ctx = BATCHES["mixed"]
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=2, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device, window=window,
                           seed=seed_of("window", window))
    _check(target, kernel, step, torch.float32)


def test_attention_kernel_is_reusable_across_steps(target):
    """One kernel object serves every step of a model: state from one batch never leaks."""
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, max_model_len=256, max_num_seqs=8)
    kernel = _kernel(target, spec)
    for i, batch in enumerate(["mixed", "decode", "prefill", "decode"]):
        q_lens, ctx = BATCHES[batch]
        step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=2, head_size=64, block_size=16,
                               dtype=torch.float32, device=target.device, seed=seed_of("reuse", i))
        _check(target, kernel, step, torch.float32)


@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_fused_rotary_equals_rotating_first(target, batch):
    """A kernel that declares ``fuses_rotary``: ``forward`` given unrotated q and k with their
    positions and the cos/sin cache gives what rotating first (the reference's NeoX rotation)
    and calling ``forward`` without them gives: the output and both caches."""
    from tessellm.backends.reference.ops import ReferenceOps
    from tessellm.layers.rotary import inverse_frequencies

    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, max_model_len=256, max_num_seqs=8)
    kernel = _kernel(target, spec)
    if not getattr(kernel, "fuses_rotary", False):
        pytest.skip(f"the {target.name!r} attention kernel does not declare fuses_rotary")
    q_lens, ctx = BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=4, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device, seed=seed_of("rotary", batch))
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, q_lens)])
    freqs = torch.outer(torch.arange(256, dtype=torch.float32), inverse_frequencies(64, 10000.0, None))
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1)
    q_rot, k_rot = ReferenceOps().rotary_embedding(positions, step.q.cpu().reshape(len(positions), -1),
                                                   step.k.cpu().reshape(len(positions), -1), cos_sin, 64)
    dev = target.device
    md = kernel.build_metadata(step.batch)
    k_first, v_first = step.k_cache.clone(), step.v_cache.clone()
    want = kernel.forward(q_rot.view_as(step.q).to(dev), k_rot.view_as(step.k).to(dev), step.v.clone(),
                          k_first, v_first, md, step.scale)
    got = kernel.forward(step.q.clone(), step.k.clone(), step.v.clone(), step.k_cache, step.v_cache,
                         md, step.scale, positions=positions.to(dev), cos_sin_cache=cos_sin.to(dev))
    tol = tolerance(torch.float32)
    torch.testing.assert_close(got.cpu(), want.cpu(), **tol)
    torch.testing.assert_close(step.k_cache.cpu(), k_first.cpu(), **tol)
    assert torch.equal(step.v_cache.cpu(), v_first.cpu()), "v is written unrotated, as is"


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("batch", ["mixed", "verify"])
def test_attention_logit_softcap(target, batch, window):
    """``AttentionSpec.logit_softcap`` (Gemma 2): scores ``cap * tanh(scale * q.k / cap)``
    before the mask and softmax. A kernel that serves a capped spec must declare
    ``supports_logit_softcap``; one that does not is skipped (the engine refuses soft-capped
    models on it), unless the backend's capabilities claim ``logit_softcap``."""
    cap = 1.5  # scores here reach a few units: the cap changes every output row
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, sliding_window=window, logit_softcap=cap,
                         max_model_len=256, max_num_seqs=8)
    kernel = _kernel_declaring(target, spec, "supports_logit_softcap", "logit_softcap",
                               "soft-capping attention kernel")
    q_lens, ctx = BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=2, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device, window=window,
                           seed=seed_of("softcap", batch, window), logit_softcap=cap,
                           q_gain=3.0)  # larger scores: a kernel that ignores the cap fails
    _check(target, kernel, step, torch.float32)


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("batch", ["decode", "mixed", "verify"])
def test_attention_sinks(target, batch, window):
    """``AttentionSpec.attention_sinks`` (gpt-oss): forward's ``sinks`` ``[H]`` join each
    head's softmax denominator as keys with no value. A kernel that serves such a spec must
    declare ``supports_attention_sinks``; one that does not is skipped (the engine refuses
    models with sinks on it), unless the backend's capabilities claim ``attention_sinks``."""
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, sliding_window=window, attention_sinks=True,
                         max_model_len=256, max_num_seqs=8)
    kernel = _kernel_declaring(target, spec, "supports_attention_sinks", "attention_sinks",
                               "attention kernel with sinks")
    q_lens, ctx = BATCHES[batch]
    # Sinks from well below to well above the scores: a kernel that drops them, or joins one
    # per split or tile instead of once per row, or takes another head's, is off everywhere.
    sinks = torch.tensor([-1.0, 3.0, 0.5, 5.0])
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=2, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device, window=window,
                           seed=seed_of("sinks", batch, window), sinks=sinks)
    _check(target, kernel, step, torch.float32)


# name -> (query_lens, ctx_lens, per sequence: its image spans as (first, last) query rows)
KEY_LIMIT_BATCHES = {
    # a chunk that is one image; an image crossing blocks and the kernels' query tiles; two
    # images in one chunk, the second ending the chunk
    "prefill": ([9, 40, 23], [0, 3, 0], [[(0, 8)], [(2, 35)], [(1, 6), (10, 22)]]),
    "mixed": ([1, 1, 12, 20], [12, 40, 5, 17], [[], [], [(3, 9)], [(0, 0), (4, 19)]]),
    # an encoder's step (BERT: bidirectional attention): whole sequences, each row seeing its
    # sequence's last key; one sequence crosses blocks and the kernels' query tiles
    "whole-sequences": ([9, 70, 1, 33], [0, 0, 0, 0], [[(0, 8)], [(0, 69)], [(0, 0)], [(0, 32)]]),
}


def image_key_limits(q_lens: list[int], ctx: list[int], spans: list[list]) -> list[int]:
    """Per query row, the last key it sees: its position, or its image's last position."""
    limits = []
    for n, c, seq_spans in zip(q_lens, ctx, spans):
        rows = list(range(c, c + n))
        for first, last in seq_spans:
            rows[first:last + 1] = [c + last] * (last + 1 - first)
        limits += rows
    return limits


@pytest.mark.parametrize("window", [None, 6])
@pytest.mark.parametrize("batch", list(KEY_LIMIT_BATCHES))
def test_attention_key_limits(target, batch, window):
    """``AttentionSpec.prefill_key_limits`` (Gemma 3's images, encoders' whole sequences): a
    row of an image sees the image's later keys too (``AttentionBatch.key_limits``), the
    sliding window still relative to its position. A kernel that serves such a spec must declare ``supports_key_limits``;
    one that does not is skipped (the engine refuses such models on it), unless the backend's
    capabilities claim ``key_limits``."""
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=64, dtype=torch.float32,
                         block_size=16, sliding_window=window, prefill_key_limits=True,
                         max_model_len=256, max_num_seqs=8)
    kernel = _kernel_declaring(target, spec, "supports_key_limits", "key_limits",
                               "attention kernel with key limits")
    q_lens, ctx, spans = KEY_LIMIT_BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=2, group=2, head_size=64, block_size=16,
                           dtype=torch.float32, device=target.device, window=window,
                           seed=seed_of("key_limits", batch, window),
                           key_limits=image_key_limits(q_lens, ctx, spans))
    _check(target, kernel, step, torch.float32)
