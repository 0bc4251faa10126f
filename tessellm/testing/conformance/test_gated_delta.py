"""``FusedOps``' gated delta rule ops (``gated_delta_chunk``, ``gated_delta_step``; declared by
``supports_gated_delta``, with ``mamba_conv1d`` beside them) against the token-by-token
recurrence: a mixed step of decodes and prefill chunks of uneven lengths (one token, longer
than any sensible chunk) in non-consecutive state slots, with grouped value heads (Hv = 2 Hk),
continued over a second step so the states written by the first are read back; slots the step
does not name stay untouched."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.gated_delta import sequential_gated_delta
from tessellm.backends.spec import OpsSpec
from tessellm.core.mamba_state import make_batch

HK, HV, K, V = 2, 4, 16, 12  # key heads, value heads, key and value head sizes


def _gated_delta_ops(target, dtype):
    ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
    if ops is None or not getattr(ops, "supports_gated_delta", False):
        pytest.skip(f"{target.name} does not declare supports_gated_delta (gated DeltaNet "
                    "models are refused)")
    return ops


def _inputs(t, g):
    """Raw q, k (the ops normalize them), v, the log decay g <= 0 and beta in (0, 1)."""
    return (torch.randn(t, HK, K, generator=g), torch.randn(t, HK, K, generator=g),
            torch.randn(t, HV, V, generator=g), -torch.rand(t, HV, generator=g),
            torch.rand(t, HV, generator=g))


def test_gated_delta_chunk_and_step_match_the_recurrence(target):
    dtype = torch.float32
    ops = _gated_delta_ops(target, dtype)
    g = torch.Generator().manual_seed(2)
    scale = K ** -0.5
    slots = [2, 6, 0, 4]
    steps = [[1, 1, 1, 70], [1, 1, 9, 33]]  # decodes first; prefill chunks of uneven lengths
    total = [sum(s[i] for s in steps) for i in range(4)]
    seqs = [_inputs(n, g) for n in total]
    init = torch.randn(8, HV, K, V, generator=g) * 0.3  # every sequence has an earlier state
    untouched = init[[1, 3, 5, 7]].clone()
    dev = target.device
    state = init.clone().to(dev)
    start = [0] * 4
    for lengths in steps:
        batch = make_batch(lengths, slots, dev)
        parts = [[t[start[i]:start[i] + n] for t in seqs[i]] for i, n in enumerate(lengths)]
        q, k, v, gate, beta = (torch.cat([p[j] for p in parts]).to(dev) for j in range(5))
        nd, rows = batch.num_decodes, batch.query_start_loc_host[batch.num_decodes]
        got = [ops.gated_delta_step(q[:rows], k[:rows], v[:rows], gate[:rows], beta[:rows],
                                    state, batch.state_indices[:nd], scale)]
        if batch.prefills is not None:
            got.append(ops.gated_delta_chunk(q[rows:], k[rows:], v[rows:], gate[rows:],
                                             beta[rows:], state, batch.prefills, scale))
        got = torch.cat(got).cpu()
        assert got.shape == v.shape and got.dtype == dtype
        row = 0
        for i, n in enumerate(lengths):
            end = start[i] + n
            want, final = sequential_gated_delta(*(t[:end] for t in seqs[i]), init[slots[i]],
                                                 scale)
            torch.testing.assert_close(got[row:row + n], want[start[i]:end], atol=2e-4,
                                       rtol=2e-4)
            torch.testing.assert_close(state[slots[i]].cpu(), final, atol=2e-4, rtol=2e-4)
            row += n
            start[i] = end
    torch.testing.assert_close(state.cpu()[[1, 3, 5, 7]], untouched)


def test_gated_delta_ops_come_with_the_conv(target):
    """The model runs ``mamba_conv1d`` before the gated delta rule: an ops object declaring
    one declares the other's op too."""
    ops = _gated_delta_ops(target, torch.float32)
    assert callable(getattr(ops, "mamba_conv1d", None))


def test_gated_delta_keeps_states_inside_the_step(target):
    """Ops that declare ``gated_delta_state_saves`` (plugin API 22): ``gated_delta_chunk``
    given a snapshot pool writes the state after each ``MambaBatch.state_saves`` offset there
    (offsets inside and across 32-token chunks), outputs and final states as without saves;
    each snapshot the recurrence's state after that many tokens."""
    dtype = torch.float32
    ops = _gated_delta_ops(target, dtype)
    if not getattr(ops, "gated_delta_state_saves", False):
        pytest.skip(f"{target.name} does not declare gated_delta_state_saves (the layers run "
                    "its chunk op once per piece between the saves)")
    g = torch.Generator().manual_seed(6)
    scale = K ** -0.5
    lengths, slots, saves = [13, 70], [5, 1], [(0, 4, 2), (1, 16, 0), (1, 64, 1)]
    seqs = [_inputs(n, g) for n in lengths]
    init = torch.randn(6, HV, K, V, generator=g) * 0.3
    dev = target.device
    batch = make_batch(lengths, slots, dev, saves=saves).prefills
    q, k, v, gate, beta = (torch.cat([s[j] for s in seqs]).to(dev) for j in range(5))
    state, pool = init.clone().to(dev), torch.zeros(3, HV, K, V, device=dev)
    got = ops.gated_delta_chunk(q, k, v, gate, beta, state, batch, scale, snapshots=pool).cpu()
    row = 0
    for i, n in enumerate(lengths):
        want, final = sequential_gated_delta(*seqs[i], init[slots[i]], scale)
        torch.testing.assert_close(got[row:row + n], want, atol=2e-4, rtol=2e-4)
        torch.testing.assert_close(state[slots[i]].cpu(), final, atol=2e-4, rtol=2e-4)
        row += n
    for seq, offset, slot in saves:
        _, at = sequential_gated_delta(*(t[:offset] for t in seqs[seq]), init[slots[seq]], scale)
        torch.testing.assert_close(pool[slot].cpu(), at, atol=2e-4, rtol=2e-4)
