"""The cpu kernel's paths for attention sinks that the conformance case (eager steps with host
lists) does not reach: a captured verify step and a captured decode step (no host lists, the
block table's whole width, padding rows), each against the reference with the same sinks; and
a layer with sinks never loads the C decode kernel (it has none)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from tessellm.backends.cpu.attention import CpuAttentionKernel, _native_shapes
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


def test_layers_with_sinks_skip_the_c_decode_kernel():
    assert _native_shapes(_spec(sinks=False))
    assert not _native_shapes(_spec(sinks=True))
    assert CpuAttentionKernel(_spec()).native is None
