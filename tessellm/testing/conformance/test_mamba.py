"""``FusedOps``' Mamba2 mixer ops (``mamba_conv1d``, ``mamba_chunk_scan``,
``mamba_state_update``; declared by ``supports_mamba2``) against the token-by-token recurrence:
a mixed step of decodes and prefill chunks of uneven lengths (shorter than the conv kernel,
longer than a scan chunk) in non-consecutive state slots, continued over a second step so the
states written by the first are read back; slots the step does not name stay untouched; prefill
chunks of hundreds of tokens (many scan chunks) the same way; the conv's x and the scan's dt
given as the mixer gives them (strided rows where the ops declare ``mamba_strided_inputs``). And the
conv1d of a captured decode step, whose slots are on the device only."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessellm.backends.reference.mamba import sequential_scan
from tessellm.backends.spec import MambaBatch, OpsSpec
from tessellm.core.mamba_state import make_batch
from tessellm.testing.harness import tolerance

H, P, G, N, K, CHUNK = 4, 8, 2, 16, 4, 8  # heads, head dim, groups, state, conv width, scan chunk


def _mamba_ops(target, dtype):
    ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
    if ops is None or not getattr(ops, "supports_mamba2", False):
        pytest.skip(f"{target.name} does not declare supports_mamba2 (Mamba models are refused)")
    return ops


def _batch(lengths, slots, device) -> MambaBatch:
    return make_batch(lengths, slots, device)


def _conv_oracle(x_all, weight, bias):
    """The whole history of one sequence at once: ``[L, C]`` -> ``[L, C]``."""
    y = F.conv1d(F.pad(x_all.t()[None], (K - 1, 0)), weight[:, None, :], bias, groups=x_all.shape[1])
    return F.silu(y[0]).t()


def test_mamba_conv1d_continues_each_sequence(target):
    dtype = torch.float32
    ops = _mamba_ops(target, dtype)
    g = torch.Generator().manual_seed(0)
    c, slots = 24, [5, 0, 3, 1]
    weight, bias = torch.randn(c, K, generator=g), torch.randn(c, generator=g)
    steps = [[1, 1, 2, 11], [1, 1, 1, 7]]  # step 2 continues every sequence of step 1
    history = [torch.randn(1 + sum(s[i] for s in steps), c, generator=g) for i in range(4)]
    state = torch.zeros(7, c, K - 1)
    state[[5, 0]] = torch.randn(2, c, K - 1, generator=g)  # two sequences with earlier tokens
    # their "earlier tokens" are the state: prepend them to the oracle's history
    full = [torch.cat([state[s].t(), h[1:]]) if s in (5, 0) else torch.cat([torch.zeros(K - 1, c), h[1:]])
            for s, h in zip(slots, history)]
    untouched = state[[2, 4, 6]].clone()
    dev_state = state.to(target.device)
    start = [0] * 4
    for lengths in steps:
        batch = _batch(lengths, slots, target.device)
        x = torch.cat([h[1 + start[i]:1 + start[i] + n] for i, (h, n) in enumerate(zip(history, lengths))])
        x = _strided_rows(x, target.device, ops)  # as the mixer passes it: a view of in_proj's output
        got = ops.mamba_conv1d(x, weight.to(target.device), bias.to(target.device),
                               dev_state, batch, "silu").cpu()
        row = 0
        for i, n in enumerate(lengths):
            want = _conv_oracle(full[i], weight, bias)[K - 1 + start[i]:K - 1 + start[i] + n]
            torch.testing.assert_close(got[row:row + n], want, **tolerance(dtype))
            row += n
            start[i] += n
    torch.testing.assert_close(dev_state.cpu()[[2, 4, 6]], untouched)


def _strided_rows(x, device, ops):
    """``x [T, C]`` on ``device`` as the mixer passes it to ``ops``: a column view of a wider
    tensor (rows strided, the last dim contiguous) where the ops declare
    ``mamba_strided_inputs`` (plugin API 17, ``backends/spec.py``), a contiguous copy otherwise."""
    if not getattr(ops, "mamba_strided_inputs", False):
        return x.to(device).contiguous()
    wide = torch.cat([x, torch.full((x.shape[0], 3), float("nan"))], dim=1).to(device)
    return wide[:, :x.shape[1]]


def _ssm_inputs(t, g):
    return (torch.randn(t, H, P, generator=g), torch.randn(t, H, generator=g) - 1.0,
            torch.randn(t, G, N, generator=g), torch.randn(t, G, N, generator=g))


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.01, 0.5)])
def test_mamba_scan_and_state_update_match_the_recurrence(target, dt_limit):
    dtype = torch.float32
    ops = _mamba_ops(target, dtype)
    g = torch.Generator().manual_seed(1)
    A = -torch.rand(H, generator=g) * 2 - 0.1
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    slots = [2, 6, 0, 4]
    steps = [[1, 1, 5, 19], [1, 1, 1, 8]]  # decodes first; prefill chunks around the scan chunk
    total = [sum(s[i] for s in steps) for i in range(4)]
    seqs = [_ssm_inputs(n, g) for n in total]
    init = torch.randn(8, H, P, N, generator=g) * 0.3  # every sequence has an earlier state
    untouched = init[[1, 3, 5, 7]].clone()
    state = init.clone().to(target.device)
    dev = target.device
    params = [t.to(dev) for t in (A, D, dt_bias)]
    start = [0] * 4
    for lengths in steps:
        batch = _batch(lengths, slots, dev)
        parts = [[t[start[i]:start[i] + n] for t in seqs[i]] for i, n in enumerate(lengths)]
        x, dt, B, C = (torch.cat([p[j] for p in parts]).to(dev) for j in range(4))
        dt = _strided_rows(dt.cpu(), dev, ops)
        nd, rows = batch.num_decodes, batch.query_start_loc_host[batch.num_decodes]
        y_dec = ops.mamba_state_update(x[:rows], dt[:rows], params[0], B[:rows], C[:rows], params[1],
                                       params[2], state, batch.state_indices[:nd], dt_limit)
        y_pre = ops.mamba_chunk_scan(x[rows:], dt[rows:], params[0], B[rows:], C[rows:], params[1],
                                     params[2], state, batch.prefills, CHUNK, dt_limit)
        got = torch.cat([y_dec, y_pre]).cpu()
        assert got.shape == x.shape and got.dtype == dtype
        row = 0
        for i, n in enumerate(lengths):
            end = start[i] + n
            xs, dts, Bs, Cs = (t[:end] for t in seqs[i])
            want, final = sequential_scan(xs, dts, A, Bs, Cs, D, dt_bias, init[slots[i]], dt_limit)
            torch.testing.assert_close(got[row:row + n], want[start[i]:end], atol=2e-4, rtol=2e-4)
            torch.testing.assert_close(state[slots[i]].cpu(), final, atol=2e-4, rtol=2e-4)
            row += n
            start[i] = end
    torch.testing.assert_close(state.cpu()[[1, 3, 5, 7]], untouched)


def test_mamba_scan_long_sequences_over_many_chunks(target):
    """Prefill chunks of several hundred tokens (a parallel SSD kernel cuts them into chunks of
    its own: 64 to 256 tokens), of different lengths, from earlier states, over two steps whose
    cut falls inside a chunk, in non-consecutive slots; heads sharing B and C (one group)."""
    dtype = torch.float32
    ops = _mamba_ops(target, dtype)
    g = torch.Generator().manual_seed(4)
    h, p, n = 6, 8, 16
    A = -torch.rand(h, generator=g) * 0.5 - 0.02  # slow decay: early tokens still count at the end
    D, dt_bias = torch.randn(h, generator=g), torch.randn(h, generator=g) * 0.5
    slots = [3, 0, 6]
    steps = [[260, 37, 129], [100, 291, 5]]
    total = [sum(s[i] for s in steps) for i in range(3)]
    seqs = [(torch.randn(t, h, p, generator=g), torch.randn(t, h, generator=g) - 2.0,
             torch.randn(t, 1, n, generator=g), torch.randn(t, 1, n, generator=g)) for t in total]
    init = torch.randn(8, h, p, n, generator=g) * 0.3
    init[0] = 0.0  # one fresh request
    untouched = init[[1, 2, 4, 5, 7]].clone()
    dev = target.device
    state = init.clone().to(dev)
    params = [t.to(dev) for t in (A, D, dt_bias)]
    start = [0] * 3
    for lengths in steps:
        batch = _batch(lengths, slots, dev)
        parts = [[t[start[i]:start[i] + k] for t in seqs[i]] for i, k in enumerate(lengths)]
        x, dt, B, C = (torch.cat([q[j] for q in parts]).to(dev) for j in range(4))
        dt = _strided_rows(dt.cpu(), dev, ops)
        got = ops.mamba_chunk_scan(x, dt, params[0], B, C, params[1], params[2], state,
                                   batch.prefills, 256, (0.0, float("inf"))).cpu()
        row = 0
        for i, k in enumerate(lengths):
            end = start[i] + k
            xs, dts, Bs, Cs = (t[:end] for t in seqs[i])
            want, final = sequential_scan(xs, dts, A, Bs, Cs, D, dt_bias, init[slots[i]])
            torch.testing.assert_close(got[row:row + k], want[start[i]:end], atol=5e-4, rtol=5e-4)
            torch.testing.assert_close(state[slots[i]].cpu(), final, atol=5e-4, rtol=5e-4)
            row += k
            start[i] = end
    torch.testing.assert_close(state.cpu()[[1, 2, 4, 5, 7]], untouched)


def test_mamba_conv1d_decodes_without_host_slots(target):
    """A captured decode step's batch (``MambaStateCache.decode_batch``): one token per row,
    the slots on the device only (``state_indices_host`` empty), padded rows sharing a scratch
    slot. The conv1d reads and writes the device slots: the same outputs and states as the
    batch with host slots, and the slots the step does not name stay untouched."""
    ops = _mamba_ops(target, torch.float32)
    g = torch.Generator().manual_seed(2)
    c, slots = 24, [5, 0, 3, 6, 6]  # rows 3 and 4: padded rows in scratch slot 6
    weight, bias = torch.randn(c, K, generator=g), torch.randn(c, generator=g)
    x = torch.randn(len(slots), c, generator=g).to(target.device)
    init = torch.randn(7, c, K - 1, generator=g).to(target.device)
    full = make_batch([1] * len(slots), slots, target.device)
    captured = MambaBatch(full.query_start_loc, full.state_indices, len(slots),
                          list(range(len(slots) + 1)), [])
    args = weight.to(target.device), bias.to(target.device)
    got_state, want_state = init.clone(), init.clone()
    got = ops.mamba_conv1d(x, *args, got_state, captured, "silu").cpu()
    want = ops.mamba_conv1d(x, *args, want_state, full, "silu").cpu()
    torch.testing.assert_close(got[:3], want[:3])
    torch.testing.assert_close(got_state[:6].cpu(), want_state[:6].cpu())
    torch.testing.assert_close(got_state[[1, 2, 4]].cpu(), init[[1, 2, 4]].cpu())


def test_mamba_conv_keeps_states_inside_the_step(target):
    """Ops that declare ``mamba_conv_state_saves`` (plugin API 23): ``mamba_conv1d`` given a
    snapshot pool writes the conv state after each ``MambaBatch.state_saves`` offset there (a
    step with decodes first; offsets under the conv's window, whose state columns come from
    the slot, and past it; two saves in one sequence), the slots it names alone; outputs and
    final states as without saves. Each snapshot is the K - 1 inputs before that token."""
    dtype = torch.float32
    ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
    if ops is None or not callable(getattr(ops, "mamba_conv1d", None)):
        pytest.skip(f"{target.name} has no mamba_conv1d (Mamba and gated DeltaNet models are "
                    "refused)")
    if not getattr(ops, "mamba_conv_state_saves", False):
        pytest.skip(f"{target.name} does not declare mamba_conv_state_saves (the layers copy "
                    "the conv states from its input before the op)")
    g = torch.Generator().manual_seed(6)
    c, dev = 20, target.device
    lengths, slots = [1, 1, 13, 2, 9], [5, 0, 3, 6, 1]
    saves = [(2, 1, 3), (2, 8, 0), (3, 1, 5), (4, 2, 2), (4, 6, 1)]
    weight, bias = torch.randn(c, K, generator=g), torch.randn(c, generator=g)
    x = torch.randn(sum(lengths), c, generator=g)
    init = torch.randn(8, c, K - 1, generator=g)
    args = [weight.to(dev), bias.to(dev)]
    want_state = init.clone().to(dev)
    want = ops.mamba_conv1d(_strided_rows(x, dev, ops), *args, want_state,
                            make_batch(lengths, slots, dev), "silu").cpu()
    state, pool = init.clone().to(dev), torch.zeros(7, c, K - 1, device=dev)
    got = ops.mamba_conv1d(_strided_rows(x, dev, ops), *args, state,
                           make_batch(lengths, slots, dev, saves=saves), "silu",
                           snapshots=pool).cpu()
    torch.testing.assert_close(got, want, **tolerance(dtype))
    torch.testing.assert_close(state.cpu(), want_state.cpu(), **tolerance(dtype))
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    pool = pool.cpu()
    for seq, offset, slot in saves:
        # the sequence's inputs after its state's K - 1: the K - 1 before token ``offset``
        history = torch.cat([init[slots[seq]], x[starts[seq]:starts[seq] + lengths[seq]].t()], 1)
        torch.testing.assert_close(pool[slot], history[:, offset:offset + K - 1], rtol=0, atol=0)
    named = {slot for _, _, slot in saves}
    for slot in set(range(pool.shape[0])) - named:
        assert not pool[slot].any(), f"snapshot slot {slot} was named by no save but written"


def test_mamba_scan_keeps_states_inside_the_step(target):
    """Ops that declare ``mamba_state_saves`` (plugin API 21): ``mamba_chunk_scan`` given a
    snapshot pool writes the state after each ``MambaBatch.state_saves`` offset there (short
    and long sequences, offsets inside and across the op's chunks), outputs and final states
    as without saves; each snapshot the recurrence's state after that many tokens."""
    dtype = torch.float32
    ops = _mamba_ops(target, dtype)
    if not getattr(ops, "mamba_state_saves", False):
        pytest.skip(f"{target.name} does not declare mamba_state_saves (the layers run its scan "
                    "once per piece between the saves)")
    g = torch.Generator().manual_seed(5)
    A = -torch.rand(H, generator=g) * 0.5 - 0.05
    D, dt_bias = torch.randn(H, generator=g), torch.randn(H, generator=g) * 0.5
    dev = target.device
    for lengths, saves in (([13, 40], [(0, 4, 2), (1, 16, 0), (1, 32, 1)]),
                           ([300, 7], [(0, 16, 1), (0, 272, 3), (1, 3, 0)])):
        slots = [5, 1]
        seqs = [_ssm_inputs(n, g) for n in lengths]
        init = torch.randn(6, H, P, N, generator=g) * 0.3
        batch = make_batch(lengths, slots, dev, saves=saves).prefills
        x, dt, B, C = (torch.cat([s[j] for s in seqs]).to(dev) for j in range(4))
        state, pool = init.clone().to(dev), torch.zeros(4, H, P, N, device=dev)
        params = [t.to(dev) for t in (A, D, dt_bias)]
        got = ops.mamba_chunk_scan(x, dt, params[0], B, C, params[1], params[2], state, batch,
                                   CHUNK, (0.0, float("inf")), snapshots=pool).cpu()
        row = 0
        for i, n in enumerate(lengths):
            want, final = sequential_scan(*seqs[i][:2], A, *seqs[i][2:], D, dt_bias,
                                          init[slots[i]])
            torch.testing.assert_close(got[row:row + n], want, atol=5e-4, rtol=5e-4)
            torch.testing.assert_close(state[slots[i]].cpu(), final, atol=5e-4, rtol=5e-4)
            row += n
        for seq, offset, slot in saves:
            xs, dts, Bs, Cs = (t[:offset] for t in seqs[seq])
            _, at = sequential_scan(xs, dts, A, Bs, Cs, D, dt_bias, init[slots[seq]])
            torch.testing.assert_close(pool[slot].cpu(), at, atol=5e-4, rtol=5e-4)
