"""The Triton Mamba2 kernels (``kernels/mamba``: the causal conv1d with per-request state, the
single-token state update) against the pure-torch reference ops, at tiny sizes (the Triton
interpreter on CPU): mixed steps of decodes and prefill chunks shorter and longer than the conv
window, non-consecutive state slots, sizes that are not powers of two, float32 and float16."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference import mamba as ref
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.mamba import mamba_conv1d, mamba_state_update


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,width", [([1, 1, 2, 9], 4), ([1, 3, 17], 3)])
def test_conv1d_matches_reference(dtype, lengths, width):
    g = torch.Generator().manual_seed(len(lengths) + width)
    channels, slots = 40, [4, 0, 2, 5][:len(lengths)]
    x = torch.randn(sum(lengths), channels, generator=g).to(dtype)
    weight = torch.randn(channels, width, generator=g).to(dtype)
    bias = torch.randn(channels, generator=g).to(dtype)
    state = torch.randn(6, channels, width - 1, generator=g).to(dtype)
    batch = make_batch(lengths, slots, torch.device("cpu"))
    for b in (bias, None):
        want_state, got_state = state.clone(), state.clone()
        want = ref.causal_conv1d(x, weight, b, want_state, batch)
        got = mamba_conv1d(x, weight, b, got_state, batch)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
        torch.testing.assert_close(got, want, **tol)
        torch.testing.assert_close(got_state, want_state, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.5)])
def test_state_update_matches_reference(dtype, dt_limit):
    g = torch.Generator().manual_seed(7)
    S, H, P, G, N = 3, 6, 12, 2, 10  # P and N not powers of two
    x = torch.randn(S, H, P, generator=g).to(dtype)
    dt = (torch.randn(S, H, generator=g) * 3).to(dtype)
    dt[0, 0] = 25.0  # past softplus's threshold (20): its linear branch
    B, C = (torch.randn(S, G, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    state = torch.randn(5, H, P, N, generator=g).to(dtype)
    idx = torch.tensor([3, 0, 4], dtype=torch.int32)
    want_state, got_state = state.clone(), state.clone()
    want = ref.selective_state_update(x, dt, A, B, C, D, dt_bias, want_state, idx, dt_limit)
    got = mamba_state_update(x, dt, A, B, C, D, dt_bias, got_state, idx, dt_limit)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_state, want_state, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.05, 0.5)])
def test_chunk_scan_matches_reference(dtype, dt_limit):
    """Sequences shorter than the kernel's chunk, across several of its chunks and across the
    reference's (8 tokens), each from an earlier state in its slot."""
    from tessellm.kernels.mamba.chunk_scan import mamba_chunk_scan

    g = torch.Generator().manual_seed(11)
    lengths, slots = [1, 5, 33, 70], [3, 0, 5, 1]
    T, H, P, G, N = sum(lengths), 4, 12, 2, 10
    x = torch.randn(T, H, P, generator=g).to(dtype)
    dt = (torch.randn(T, H, generator=g) - 1.0).to(dtype)
    B, C = (torch.randn(T, G, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    state = (torch.randn(6, H, P, N, generator=g) * 0.3).to(dtype)
    batch = make_batch(lengths, slots, torch.device("cpu"))
    want_state, got_state = state.clone(), state.clone()
    want = ref.ssd_chunk_scan(x, dt, A, B, C, D, dt_bias, want_state, batch, 8, dt_limit)
    got = mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, got_state, batch, 8, dt_limit)
    tol = dict(atol=2e-4, rtol=2e-4) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(got_state, want_state, **tol)
