"""Pieces of the rocm, xpu and tpu plugins that can be checked without their hardware, and the
device graph runner on a CUDA GPU when one is present (HIP graphs use the same torch API)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.registry import get_registry
from tessellm.backends.reference.device_graph_runner import TorchDeviceGraphRunner, default_capture_sizes
from tessellm.backends.tpu.graph_runner import pow2_capture_sizes
from tessellm.backends.tpu.xla_attention import XlaPagedAttentionKernel, pow2_bucket
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step, tolerance


def test_hardware_backends_are_unavailable_here_and_say_so():
    registry = get_registry()
    for name in ("rocm", "xpu", "tpu"):
        backend = registry.backends[name]
        if backend.is_available():
            continue  # running on that hardware: nothing to assert
        assert backend.validated_on in ("emulation", "untested")
        assert "Never run" in backend.validation_note


def test_capture_ladders():
    assert default_capture_sizes(40) == (1, 2, 4, 8, 16, 32, 40)
    assert default_capture_sizes(1) == (1,)
    assert pow2_capture_sizes(48) == (1, 2, 4, 8, 16, 32, 64)
    assert [pow2_bucket(n) for n in (0, 1, 3, 8, 9)] == [1, 1, 4, 8, 16]


def test_xla_cache_write_pads_without_slot_minus_one():
    """The XLA path has no data-dependent shapes: padding rows (slot -1) rewrite the first real
    token's slot with its own values, leaving the cache exactly as the reference leaves it."""
    step = make_paged_step([1, 1, 3], [4, 9, 0], num_kv_heads=2, group=2, head_size=32,
                           block_size=8, dtype=torch.float32, device="cpu")
    spec = AttentionSpec(num_heads=4, num_kv_heads=2, head_size=32, dtype=torch.float32, block_size=8)
    kernel = XlaPagedAttentionKernel(spec)
    pad = lambda t, fill: torch.cat([t, torch.full((2, *t.shape[1:]), fill, dtype=t.dtype)])  # noqa: E731
    slots = pad(step.batch.slot_mapping, -1)
    kernel.write_cache(pad(step.k, 7.0), pad(step.v, 7.0), step.k_cache, step.v_cache, slots)
    assert torch.equal(step.k_cache, step.ref_k_cache) and torch.equal(step.v_cache, step.ref_v_cache)
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(step.batch), step.scale)
    torch.testing.assert_close(out, step.ref_out, **tolerance(torch.float32))


def test_rocm_fp8_uses_ocp_format_off_mi300():
    from tessellm.backends.rocm.quant import fp8_dtype_for

    assert fp8_dtype_for(torch.device("cpu")) == torch.float8_e4m3fn
    assert torch.finfo(torch.float8_e4m3fnuz).max == 240.0  # the MI300 format's range


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA or ROCm GPU")
def test_device_graph_runner_replays_rocm_pieces_on_gpu():
    """rocm's graph runner, fused ops and AMD-tiled attention kernel, captured in a device graph
    (CUDA graphs on NVIDIA, HIP graphs on AMD) and replayed against eager."""
    from tessellm.testing.conformance.test_graph import SIZES, _Step
    from tessellm.testing.harness import ConformanceTarget

    registry = get_registry()
    target = ConformanceTarget("rocm", registry.backends["rocm"], registry,
                               torch.device("cuda"), False)
    step = _Step(target)
    assert step.kernel is not None and step.kernel.name == "triton-rocm"
    runner = TorchDeviceGraphRunner(SIZES)
    runner.capture(step, lambda size: step.inputs(size, size, seed=size))
    for trial, real in enumerate([1, 3, 8, 5, 2]):
        size = runner.padded_size(real)
        inputs = step.inputs(size, real, seed=50 + trial)
        got = runner.run(inputs)[:real].clone()
        want = step(*[t.clone() for t in inputs])[:real]
        torch.testing.assert_close(got, want, atol=2e-3, rtol=2e-3)
