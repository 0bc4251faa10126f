"""The Triton gated delta rule kernels (``kernels/gated_delta``: the single-token step of
decoding requests, the chunked pass over prefill chunks) against the pure-torch reference
(``backends/reference/gated_delta.py``), which is itself checked against the token-by-token
recurrence, at tiny sizes (the Triton interpreter on CPU): prefill chunks shorter than, equal
to and longer than the kernel's chunk, grouped value heads (Hv = 2 Hk), head sizes that are not
powers of two, non-consecutive state slots (the others stay untouched), float32 and float16.
On a GPU the kernels' inputs are on cuda (the compiled launch refuses CPU tensors), the
reference's stay on the CPU."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference import gated_delta as ref
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.gated_delta import gated_delta_chunk, gated_delta_step

HK, HV = 2, 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _on_device(*tensors):
    return [t.to(DEVICE) for t in tensors]


def _inputs(t, K, V, g):
    return (torch.randn(t, HK, K, generator=g), torch.randn(t, HK, K, generator=g),
            torch.randn(t, HV, V, generator=g), -torch.rand(t, HV, generator=g) * 0.7,
            torch.rand(t, HV, generator=g))


@pytest.mark.parametrize("chunk", [16, 64])
def test_reference_chunk_matches_the_recurrence(chunk):
    g = torch.Generator().manual_seed(0)
    K, V, lengths, slots = 12, 10, [5, 40, 1], [3, 0, 2]
    seqs = [_inputs(n, K, V, g) for n in lengths]
    init = torch.randn(4, HV, K, V, generator=g) * 0.3
    state = init.clone()
    flat = [torch.cat([s[j] for s in seqs]) for j in range(5)]
    got = ref.gated_delta_chunk(*flat, state, make_batch(lengths, slots, torch.device("cpu")),
                                K ** -0.5, chunk=chunk)
    row = 0
    for (n, slot, seq) in zip(lengths, slots, seqs):
        want, final = ref.sequential_gated_delta(*seq, init[slot], K ** -0.5)
        torch.testing.assert_close(got[row:row + n], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(state[slot], final, atol=1e-5, rtol=1e-5)
        row += n
    torch.testing.assert_close(state[1], init[1], atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_step_kernel_matches_reference(dtype):
    g = torch.Generator().manual_seed(1)
    K, V, S = 24, 20, 3
    q, k, v, gate, beta = (t.to(dtype) for t in _inputs(S, K, V, g))
    gate = gate.float()
    state = (torch.randn(5, HV, K, V, generator=g) * 0.3).to(dtype)
    idx = torch.tensor([4, 0, 2], dtype=torch.int32)
    want_state, got_state = state.clone(), state.clone()
    want = ref.gated_delta_step(q, k, v, gate, beta, want_state, idx, K ** -0.5)
    got_state = got_state.to(DEVICE)
    got = gated_delta_step(*_on_device(q, k, v, gate, beta), got_state, idx.to(DEVICE),
                           K ** -0.5)
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_state.cpu(), want_state, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("lengths,K,V", [([3, 32, 45], 16, 16), ([70], 12, 40)])
def test_chunk_kernel_matches_reference(dtype, lengths, K, V):
    g = torch.Generator().manual_seed(len(lengths) + K)
    slots = [5, 1, 3][:len(lengths)]
    T = sum(lengths)
    q, k, v, gate, beta = (t.to(dtype) for t in _inputs(T, K, V, g))
    gate = gate.float()
    state = (torch.randn(6, HV, K, V, generator=g) * 0.3).to(dtype)
    batch = make_batch(lengths, slots, torch.device("cpu"))
    want_state, got_state = state.clone(), state.clone()
    want = ref.gated_delta_chunk(q, k, v, gate, beta, want_state, batch, K ** -0.5)
    got_state = got_state.to(DEVICE)
    got = gated_delta_chunk(*_on_device(q, k, v, gate, beta), got_state,
                            make_batch(lengths, slots, DEVICE), K ** -0.5)
    tol = dict(atol=2e-5, rtol=2e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(got.cpu(), want, **tol)
    torch.testing.assert_close(got_state.cpu(), want_state, **tol)


def test_kernels_normalize_q_and_k_with_the_reference_epsilon():
    from tessellm.kernels.gated_delta import chunk, step

    assert chunk.L2_EPS == step.L2_EPS == ref.L2_EPS
