"""The cpu kernel's paths for attention sinks: a captured verify step and a captured decode step
(no host lists, the block table's whole width, padding rows; paths the eager conformance case
does not reach), and eager decodes through the C kernel (vector and plain-C tiles, float32 and
bfloat16 caches, windows), each against the reference with the same sinks."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tessellm.backends.cpu.attention import CpuAttentionKernel
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step
from tests.backends.test_cpu_verify_capture import BLOCK, _captured

SINKS = torch.tensor([-1.0, 3.0, 0.5, 5.0])


def _spec(window=None, sinks=True):
    return AttentionSpec(4, 2, 16, torch.float32, BLOCK, "auto", window, attention_sinks=sinks)


@pytest.mark.parametrize("window", [None, 5])
def test_captured_verify_with_sinks(window):
    q, pad = 3, 2
    step = make_paged_step([q, q, q], [6, 1, 13], num_kv_heads=2, group=2, head_size=16,
                           block_size=BLOCK, dtype=torch.float32, device="cpu", window=window,
                           seed=3, sinks=SINKS)
    kernel = CpuAttentionKernel(_spec(window))
    batch = _captured(step, q, pad)
    extra = [torch.randn(pad * q, *t.shape[1:]) for t in (step.q, step.k, step.v)]
    qx, kx, vx = (torch.cat([t, e]) for t, e in zip((step.q, step.k, step.v), extra))
    out = kernel.forward(qx, kx, vx, step.k_cache, step.v_cache, kernel.build_metadata(batch),
                         step.scale, sinks=SINKS)
    torch.testing.assert_close(out[:step.q.shape[0]], step.ref_out, rtol=1e-5, atol=1e-5)


def test_captured_decode_with_sinks():
    """A captured decode step: no host lists, every decode over the table's whole width."""
    step = make_paged_step([1, 1, 1], [0, 9, 21], num_kv_heads=2, group=2, head_size=16,
                           block_size=BLOCK, dtype=torch.float32, device="cpu", seed=5,
                           sinks=SINKS)
    kernel = CpuAttentionKernel(_spec())
    batch = dataclasses.replace(step.batch, query_start_loc_host=[], seq_lens_host=[])
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(batch), step.scale, sinks=SINKS)
    torch.testing.assert_close(out, step.ref_out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_size", [64, 24])  # AVX-512 16-token tiles / plain-C tiles
@pytest.mark.parametrize("cache", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 7])
def test_native_decode_joins_sinks(head_size, cache, window):
    """Eager decodes through the C kernel (``csrc/paged_decode.c``'s join_sinks) against the
    reference; the sinks change every row (checked by the reference without them)."""
    if cache == torch.bfloat16 and head_size != 64:
        pytest.skip("one bf16 shape is enough")
    step = make_paged_step([1, 1, 1, 1], [0, 9, 30, 70], num_kv_heads=2, group=2,
                           head_size=head_size, block_size=BLOCK, dtype=cache, device="cpu",
                           window=window, seed=head_size, sinks=SINKS)
    kernel = CpuAttentionKernel(AttentionSpec(4, 2, head_size, cache, BLOCK, "auto", window,
                                              attention_sinks=True))
    if kernel.native is None:
        pytest.skip("the C kernel did not build here (no compiler, or TESSELLM_CPU_NATIVE=0)")
    md = kernel.build_metadata(step.batch)
    assert md.native_decode is not None
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale,
                         sinks=SINKS)
    tol = dict(rtol=1e-5, atol=1e-5) if cache == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(out.float(), step.ref_out.float(), **tol)
    plain = make_paged_step([1, 1, 1, 1], [0, 9, 30, 70], num_kv_heads=2, group=2,
                            head_size=head_size, block_size=BLOCK, dtype=cache, device="cpu",
                            window=window, seed=head_size).ref_out
    assert ((plain.float() - out.float()).abs().amax(dim=(1, 2)) > 1e-2).all()
