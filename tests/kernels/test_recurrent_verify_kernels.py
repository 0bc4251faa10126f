"""The fused verify kernels of speculative decoding on recurrent layers (``kernels/mamba/verify.py``:
the conv and the SSM state update; ``kernels/gated_delta/verify.py``) against the pure-torch
verify ops (``backends/reference/recurrent_verify.py``, the one-token ops run position by
position), at tiny sizes (the Triton interpreter on the CPU, the GPU where there is one):
verify sequences of 1 to 6 tokens (k = 0..5 drafts) in non-consecutive slots, their per-token
states in spare slots, batches padded as a captured verify step pads them (padding sequences in
the scratch slot), strided inputs as the layers pass them, head and state sizes that are not
powers of two, float32 states (to 1e-5) and bfloat16 ones (the same rounding points as the
composed Triton path, the one-token kernels run position by position, which is their oracle
there: the state is rounded to its dtype after each token). Every slot the step does not name
stays as it was."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F

from tessellm.backends.reference import recurrent_verify as ref
from tessellm.core.mamba_state import make_batch
from tessellm.kernels.gated_delta import gated_delta_step
from tessellm.kernels.gated_delta.verify import gated_delta_verify
from tessellm.kernels.mamba import mamba_state_update
from tessellm.kernels.mamba.verify import mamba_conv1d_verify, mamba_state_update_verify

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SCRATCH = 0  # the padding sequences' slot (the state cache's scratch slot)

# (verify lengths, their own slots); each token but the last gets a spare slot after them
CASES = {
    "mixed": ([4, 2, 3], [6, 1, 3]),
    "k5": ([6, 6, 6], [2, 5, 4]),
    "ragged": ([1, 6, 2, 5], [3, 6, 1, 5]),
}
PADDED = ([3, 3], [4, 2])  # two real sequences, then two padding ones (all tokens in SCRATCH)
PAD_SEQS = 2


def _layout(lengths, slots, pad=0):
    """(token slots, total slots, slots named by real sequences): spares numbered from 7, the
    padding sequences' tokens all in the scratch slot."""
    token_slots, nxt = [], 7
    for n, own in zip(lengths, slots):
        token_slots += list(range(nxt, nxt + n - 1)) + [own]
        nxt += n - 1
    named = set(token_slots)
    q = lengths[0]
    token_slots += [SCRATCH] * (pad * q)
    return token_slots, nxt, named


def _batch(lengths, slots, pad, device):
    token_slots, _, _ = _layout(lengths, slots, pad)
    q = lengths[0]
    return make_batch(list(lengths) + [q] * pad, list(slots) + [SCRATCH] * pad, device,
                      len(lengths) + pad, token_slots).verifies


def _check_state(got, want, named, init, tol):
    """Named slots as the reference left them; every other slot but the scratch untouched."""
    named = sorted(named)
    torch.testing.assert_close(got[named].float(), want[named].float(), **tol)
    others = [s for s in range(init.shape[0]) if s not in named and s != SCRATCH]
    assert torch.equal(got[others], init[others])


def _oracle(dtype, torch_op, one_token_op):
    """float32: the pure-torch verify op on the CPU; bfloat16: the one-token Triton kernel
    composed position by position (the path the fused kernel replaces: the same arithmetic, so
    the same roundings of the state), on the kernels' device."""
    if dtype == torch.float32:
        return torch_op, torch.device("cpu"), dict(atol=1e-5, rtol=1e-5)
    return partial(torch_op, step=one_token_op), DEVICE, dict(atol=1e-2, rtol=1e-2)


def _case(name):
    if name == "padded":
        return (*PADDED, PAD_SEQS)
    return (*CASES[name], 0)


@pytest.mark.parametrize("name", [*CASES, "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv1d_verify_matches_reference(name, dtype):
    lengths, slots, pad = _case(name)
    _, total, named = _layout(lengths, slots, pad)
    g = torch.Generator().manual_seed(len(lengths) + pad)
    C, K = 40, 4
    T = sum(lengths) + pad * lengths[0]
    xbc = torch.randn(T, C + 8, generator=g).to(dtype)
    x = xbc[:, :C]  # a column view, as the layer's split leaves it
    weight = torch.randn(C, K, generator=g).to(dtype)
    bias = torch.randn(C, generator=g).to(dtype)
    init = torch.randn(total, C, K - 1, generator=g).to(dtype)
    for b in (bias, None):
        want_state = init.clone()
        want = ref.mamba_conv1d_verify(x.float(), weight.float(), None if b is None else b.float(),
                                       want_state, _batch(lengths, slots, pad, torch.device("cpu")))
        got_state = init.clone().to(DEVICE)
        got = mamba_conv1d_verify(x.to(DEVICE), weight.to(DEVICE), None if b is None else b.to(DEVICE),
                                  got_state, _batch(lengths, slots, pad, DEVICE))
        real = sum(lengths)
        tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
        torch.testing.assert_close(got.cpu()[:real].float(), want[:real], **tol)
        # the states are the inputs themselves: exact in any dtype
        _check_state(got_state.cpu(), want_state, named, init, dict(atol=0, rtol=0))


def _ssm_inputs(T, H, P, G, N, total, dtype, g):
    xs = torch.randn(T, H, P + 3, generator=g).to(dtype)[..., :P]  # rows strided, as split
    dt = (torch.randn(T, H, generator=g) * 2).to(dtype)
    dt[0, 0] = 25.0  # past softplus's threshold: its linear branch
    B, C = (torch.randn(T, G, N, generator=g).to(dtype) for _ in range(2))
    A = -torch.rand(H, generator=g) - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g)
    init = (torch.randn(total, H, P, N, generator=g) * 0.3).to(dtype)
    return xs, dt, A, B, C, D, dt_bias, init


@pytest.mark.parametrize("name", [*CASES, "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_state_update_verify_matches_reference(name, dtype):
    dt_limit = (0.05, 0.5) if name == "mixed" else (0.0, float("inf"))  # the clamp, once
    lengths, slots, pad = _case(name)
    _, total, named = _layout(lengths, slots, pad)
    g = torch.Generator().manual_seed(3 + len(lengths))
    H, P, G, N = 4, 12, 2, 10
    T = sum(lengths) + pad * lengths[0]
    xs, dt, A, B, C, D, dt_bias, init = _ssm_inputs(T, H, P, G, N, total, dtype, g)
    op, dev, tol = _oracle(dtype, ref.mamba_state_update_verify, mamba_state_update)
    want_state = init.clone().to(dev)
    want = op(*(t.to(dev) for t in (xs, dt, A, B, C, D, dt_bias)), want_state,
              _batch(lengths, slots, pad, dev), dt_limit)
    got_state = init.clone().to(DEVICE)
    got = mamba_state_update_verify(*(t.to(DEVICE) for t in (xs, dt, A, B, C, D, dt_bias)),
                                    got_state, _batch(lengths, slots, pad, DEVICE), dt_limit)
    assert got.shape == xs.shape and got.dtype == dtype
    real = sum(lengths)
    torch.testing.assert_close(got.cpu()[:real].float(), want.cpu()[:real].float(), **tol)
    _check_state(got_state.cpu(), want_state.cpu(), named, init, tol)


@pytest.mark.parametrize("name", [*CASES, "padded"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_delta_verify_matches_reference(name, dtype):
    lengths, slots, pad = _case(name)
    _, total, named = _layout(lengths, slots, pad)
    g = torch.Generator().manual_seed(5 + len(lengths))
    HK, HV, K, V = 2, 4, 12, 10
    T = sum(lengths) + pad * lengths[0]
    qk = torch.randn(T, 2 * HK, K, generator=g).to(dtype)
    q, k = qk[:, :HK], qk[:, HK:]  # strided views
    v = torch.randn(T, HV, V, generator=g).to(dtype)
    gate, beta = -torch.rand(T, HV, generator=g) * 0.7, torch.rand(T, HV, generator=g).to(dtype)
    init = (torch.randn(total, HV, K, V, generator=g) * 0.3).to(dtype)
    scale = K ** -0.5
    op, dev, tol = _oracle(dtype, ref.gated_delta_verify, gated_delta_step)
    want_state = init.clone().to(dev)
    want = op(*(t.to(dev) for t in (q, k, v, gate, beta)), want_state,
              _batch(lengths, slots, pad, dev), scale)
    got_state = init.clone().to(DEVICE)
    got = gated_delta_verify(*(t.to(DEVICE) for t in (q, k, v, gate, beta)), got_state,
                             _batch(lengths, slots, pad, DEVICE), scale)
    assert got.shape == v.shape and got.dtype == dtype
    real = sum(lengths)
    torch.testing.assert_close(got.cpu()[:real].float(), want.cpu()[:real].float(), **tol)
    _check_state(got_state.cpu(), want_state.cpu(), named, init, tol)
