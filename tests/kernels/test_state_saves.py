"""States saved inside a prefill step (``MambaBatch.state_saves``, reference/state_saves.py):
the recurrent ops run once per piece between the save offsets give one call's outputs and final
states, and each snapshot slot gets the state after its offset (the same op run over that
prefix alone). The pure-torch references and the Triton kernels (TRITON_INTERPRET=1 on the
CPU; tests/kernels/conftest.py), at tiny sizes."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference import gated_delta as ref_delta
from tessellm.backends.reference import mamba as ref_mamba
from tessellm.backends.reference.state_saves import run_with_saves, save_conv_states
from tessellm.backends.spec import MambaBatch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
LENS = [13, 1, 9]  # three sequences (the second one token: a piece of its own round)
SLOTS = [4, 0, 2]
SAVES = [(0, 4, 1), (0, 8, 3), (2, 5, 0)]  # (sequence, offset, snapshot slot)
CONV_SAVES = [(0, 2, 1), (0, 8, 3), (2, 5, 0)]  # offset 2: under the window (K - 1 = 3)


def batch(lens, slots, saves=()):
    q = [0]
    for n in lens:
        q.append(q[-1] + n)
    return MambaBatch(torch.tensor(q, dtype=torch.int32, device=DEVICE),
                      torch.tensor(slots, dtype=torch.int32, device=DEVICE),
                      0, q, list(slots), state_saves=list(saves))


def ops(kind):
    if kind == "reference":
        return (ref_mamba.causal_conv1d,
                lambda *a: ref_mamba.ssd_chunk_scan(*a[:9], 4, a[10]),
                ref_delta.gated_delta_chunk)
    from tessellm.kernels.gated_delta import gated_delta_chunk
    from tessellm.kernels.mamba import mamba_chunk_scan, mamba_conv1d

    return mamba_conv1d, mamba_chunk_scan, gated_delta_chunk


def check_conv(conv, x, state, pool_shape):
    """``save_conv_states`` before one conv call: each pool slot the conv state after its
    offset (the conv run over the sequence's prefix alone); the call itself unchanged."""
    start = state.clone()
    pool = torch.zeros(pool_shape, dtype=state.dtype, device=DEVICE)
    save_conv_states(x, state, batch(LENS, SLOTS, CONV_SAVES), pool)
    torch.testing.assert_close(state, start, rtol=0, atol=0)
    q = batch(LENS, SLOTS).query_start_loc_host
    for seq, offset, p in CONV_SAVES:
        state.copy_(start)
        conv(x[q[seq]:q[seq] + offset], batch([offset], [SLOTS[seq]]))
        torch.testing.assert_close(pool[p], state[SLOTS[seq]], rtol=0, atol=0)


def check(op, inputs, state, pool_shape):
    """``op(inputs, batch)`` with the saves against one call, and each pool slot against the
    op run over the sequence's prefix alone from the same start state."""
    start = state.clone()
    pool = torch.zeros(pool_shape, dtype=state.dtype, device=DEVICE)
    want = op(inputs, batch(LENS, SLOTS))
    want_state = state.clone()
    state.copy_(start)
    got = run_with_saves(op, inputs, batch(LENS, SLOTS, SAVES), [(state, pool)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, want_state, rtol=1e-5, atol=1e-5)
    q = batch(LENS, SLOTS).query_start_loc_host
    for seq, offset, p in SAVES:
        alone = start.clone()
        rows = [t[q[seq]:q[seq] + offset] for t in inputs]
        b = batch([offset], [SLOTS[seq]])
        state.copy_(alone)
        op(rows, b)
        torch.testing.assert_close(pool[p], state[SLOTS[seq]], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["reference", "triton"])
def test_conv_and_scans_save_inside_the_step(kind):
    conv, scan, delta = ops(kind)
    g = torch.Generator().manual_seed(0)
    T, C, K, H, P, G, N = sum(LENS), 12, 4, 4, 8, 2, 8
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    w, bias = r(C, K), r(C)
    x, conv_state = r(T, C), r(5, C, K - 1)
    check_conv(lambda rows, b: conv(rows, w, bias, conv_state, b, "silu"), x, conv_state,
               (4, C, K - 1))
    check(lambda xs, b: conv(xs[0], w, bias, conv_state, b, "silu"), [r(T, C)],
          conv_state := r(5, C, K - 1), (4, C, K - 1))
    A, D, dt_bias = -torch.rand(H, generator=g).to(DEVICE), r(H), r(H)
    ssm = r(5, H, P, N)
    check(lambda xs, b: scan(xs[0], xs[1], A, xs[2], xs[3], D, dt_bias, ssm, b, 4,
                             (0.0, float("inf"))),
          [r(T, H, P), r(T, H), r(T, G, N), r(T, G, N)], ssm, (4, H, P, N))
    Hk, Hv, Kd, V = 2, 4, 8, 8
    st = r(5, Hv, Kd, V) * 0.1
    check(lambda xs, b: delta(*xs, st, b, Kd ** -0.5),
          [r(T, Hk, Kd), r(T, Hk, Kd), r(T, Hv, V), -torch.rand(T, Hv, generator=g).to(DEVICE),
           torch.rand(T, Hv, generator=g).to(DEVICE)], st, (4, Hv, Kd, V))


@pytest.mark.parametrize("lens,saves", [([13, 1, 9], SAVES),  # the sequential kernel, per piece
                                         ([150, 20], [(0, 16, 1), (0, 128, 3), (1, 8, 0)])])  # SSD
def test_triton_scan_keeps_the_states_itself(lens, saves):
    """``mamba_chunk_scan(..., snapshots=)`` (``FusedOps.mamba_state_saves``): the SSD kernels'
    chunks start at the offsets (the states entering them kept), the sequential kernel runs
    per piece; against the reference scan run per piece."""
    from tessellm.kernels.mamba import mamba_chunk_scan

    g = torch.Generator().manual_seed(2)
    T, H, P, G, N = sum(lens), 4, 8, 2, 8
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    A, D, dt_bias = -torch.rand(H, generator=g).to(DEVICE) * 0.3, r(H), r(H)
    x, dt, B, C = r(T, H, P), r(T, H) - 1.0, r(T, G, N), r(T, G, N)
    slots = [4, 0, 2][:len(lens)]
    init = r(5, H, P, N) * 0.3
    state, pool = init.clone(), torch.zeros(4, H, P, N, device=DEVICE)
    got = mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, state, batch(lens, slots, saves), 16,
                           snapshots=pool)
    ref_state, ref_pool = init.clone(), torch.zeros_like(pool)
    want = run_with_saves(lambda t, b: ref_mamba.ssd_chunk_scan(t[0], t[1], A, t[2], t[3], D,
                                                                dt_bias, ref_state, b, 16),
                          [x, dt, B, C], batch(lens, slots, saves), [(ref_state, ref_pool)])
    torch.testing.assert_close(got, want, rtol=5e-4, atol=5e-4)
    torch.testing.assert_close(state, ref_state, rtol=5e-4, atol=5e-4)
    torch.testing.assert_close(pool, ref_pool, rtol=5e-4, atol=5e-4)
    assert pool.abs().sum(dim=(1, 2, 3)).gt(0).sum() == len(saves)


def test_a_triton_ops_subclass_with_its_own_scan_is_not_handed_snapshots():
    """A plugin's ops built on ``TritonOps`` (plugins may import ``tessellm/kernels``) with its
    own ``mamba_chunk_scan`` of API 20 (no ``snapshots`` keyword): it does not inherit
    ``mamba_state_saves`` (API 21), so the layers run its scan once per piece, nor GPTQ act
    order over its own ``fused_experts`` (API 20); the cuda backend's ops keep both."""
    pytest.importorskip("triton")
    from tessellm.backends.cuda.ops import CudaOps
    from tessellm.kernels.fused_ops import TritonOps

    class Api20Ops(TritonOps):
        def mamba_chunk_scan(self, x, dt, A, B, C, D, dt_bias, ssm_state, batch, chunk_size,
                             dt_limit=(0.0, float("inf"))):
            return super().mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, ssm_state, batch,
                                            chunk_size, dt_limit)

        def fused_experts(self, hidden, topk_weights, topk_ids, w13, w2, w13_scale=None,
                          w2_scale=None, **variant):
            return super().fused_experts(hidden, topk_weights, topk_ids, w13, w2, w13_scale,
                                         w2_scale, **variant)

    class Declared(Api20Ops):
        mamba_state_saves = True

    assert not Api20Ops.mamba_state_saves and not Api20Ops.fused_moe_int4_act_order
    assert Declared.mamba_state_saves
    assert CudaOps.mamba_state_saves and CudaOps.fused_moe_int4_act_order
    # the layer's choice (layers/mamba_mixer.py): the per-piece path, which never passes
    # ``snapshots``, gives the one-call result through the API 20 scan
    lens, slots, saves = [13, 9], [4, 2], [(0, 4, 1), (1, 5, 0)]
    g = torch.Generator().manual_seed(3)
    H, P, N = 2, 4, 8
    x = torch.randn(22, H, P, generator=g).to(DEVICE)
    dt = torch.randn(22, H, generator=g).to(DEVICE)
    B = torch.randn(22, 1, N, generator=g).to(DEVICE)
    C = torch.randn(22, 1, N, generator=g).to(DEVICE)
    A = (-torch.rand(H, generator=g) - 0.1).to(DEVICE)
    D, dt_bias = torch.randn(H, generator=g).to(DEVICE), torch.randn(H, generator=g).to(DEVICE)
    init = (torch.randn(6, H, P, N, generator=g) * 0.3).to(DEVICE)
    ops = Api20Ops()

    def scan(rows, b):
        return ops.mamba_chunk_scan(rows[0], rows[1], A, rows[2], rows[3], D, dt_bias, state, b,
                                    8)

    state, pool = init.clone(), torch.zeros(4, H, P, N, device=DEVICE)
    got = run_with_saves(scan, [x, dt, B, C], batch(lens, slots, saves), [(state, pool)])
    state_plain = init.clone()
    want = ops.mamba_chunk_scan(x, dt, A, B, C, D, dt_bias, state_plain, batch(lens, slots), 8)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(state, state_plain, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("lens,saves", [
    ([13, 1, 9], SAVES),
    # chunk-crossing offsets (the kernel's chunks are 32 tokens), a sequence without saves,
    # saves at a sequence's start and end and two at one offset
    ([70, 40, 5], [(0, 33, 2), (0, 64, 0), (2, 0, 1), (2, 5, 3), (0, 33, 4)]),
])
def test_sequential_scan_saves_in_its_one_pass(lens, saves):
    """The sequential kernel given ``snapshots=`` stores the states at the offsets as it walks
    (one launch): its outputs, final states and snapshots are those of the kernel run once per
    piece between the offsets (``run_with_saves``; float32 states), bitwise in the interpreter."""
    from tessellm.kernels.mamba.chunk_scan import sequential_chunk_scan

    g = torch.Generator().manual_seed(3)
    T, H, P, G, N = sum(lens), 4, 8, 2, 8
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    A, D, dt_bias = -torch.rand(H, generator=g).to(DEVICE) * 0.3, r(H), r(H)
    x, dt, B, C = r(T, H, P), r(T, H) - 1.0, r(T, G, N), r(T, G, N)
    slots = [4, 0, 2]
    init = r(5, H, P, N) * 0.3
    state, pool = init.clone(), torch.zeros(5, H, P, N, device=DEVICE)
    got = sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, state, batch(lens, slots, saves),
                                snapshots=pool)
    ref_state, ref_pool = init.clone(), torch.zeros_like(pool)
    want = run_with_saves(lambda t, b: sequential_chunk_scan(t[0], t[1], A, t[2], t[3], D,
                                                             dt_bias, ref_state, b),
                          [x, dt, B, C], batch(lens, slots, saves), [(ref_state, ref_pool)])
    # Bitwise in the interpreter; compiled for a GPU (H100, session 20) the one-pass and the
    # per-piece kernels round a few outputs differently (<= 2e-6 absolute, 6e-6 relative: the
    # compiler contracts the recurrence's multiply-adds differently in the two programs).
    tol = dict(rtol=0, atol=0) if DEVICE.type == "cpu" else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(state, ref_state, **tol)
    torch.testing.assert_close(pool, ref_pool, **tol)
    assert pool.abs().sum(dim=(1, 2, 3)).gt(0).sum() == len(saves)
    # and the snapshots are the states after each prefix (the scan of it alone)
    q = batch(lens, slots).query_start_loc_host
    for seq, offset, p in saves:
        alone = init.clone()
        sequential_chunk_scan(x[q[seq]:q[seq] + offset], dt[q[seq]:q[seq] + offset], A,
                              B[q[seq]:q[seq] + offset], C[q[seq]:q[seq] + offset], D, dt_bias,
                              alone, batch([offset], [slots[seq]]))
        torch.testing.assert_close(pool[p], alone[slots[seq]], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="outside the batch"):
        sequential_chunk_scan(x, dt, A, B, C, D, dt_bias, init.clone(),
                              batch(lens, slots, [(1, lens[1] + 1, 0)]), snapshots=pool)


@pytest.mark.parametrize("lens,saves", [
    ([13, 1, 9], SAVES),
    ([70, 40, 5], [(0, 33, 2), (0, 64, 0), (2, 0, 1), (2, 5, 3), (0, 33, 4)]),
])
def test_gated_delta_chunk_saves_in_its_one_pass(lens, saves):
    """The gated delta chunk kernel given ``snapshots=``: as the sequential Mamba scan, its
    outputs, final states and snapshots bitwise those of the kernel run once per piece."""
    from tessellm.kernels.gated_delta import gated_delta_chunk

    g = torch.Generator().manual_seed(4)
    T, Hk, Hv, Kd, V = sum(lens), 2, 4, 8, 8
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE)  # noqa: E731
    inputs = [r(T, Hk, Kd), r(T, Hk, Kd), r(T, Hv, V),
              -torch.rand(T, Hv, generator=g).to(DEVICE), torch.rand(T, Hv, generator=g).to(DEVICE)]
    slots = [4, 0, 2]
    init = r(5, Hv, Kd, V) * 0.1
    state, pool = init.clone(), torch.zeros(5, Hv, Kd, V, device=DEVICE)
    got = gated_delta_chunk(*inputs, state, batch(lens, slots, saves), Kd ** -0.5,
                            snapshots=pool)
    ref_state, ref_pool = init.clone(), torch.zeros_like(pool)
    want = run_with_saves(lambda t, b: gated_delta_chunk(*t, ref_state, b, Kd ** -0.5),
                          inputs, batch(lens, slots, saves), [(ref_state, ref_pool)])
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)
    torch.testing.assert_close(pool, ref_pool, rtol=0, atol=0)
    assert pool.abs().sum(dim=(1, 2, 3)).gt(0).sum() == len(saves)
    q = batch(lens, slots).query_start_loc_host
    for seq, offset, p in saves:  # each snapshot the reference's state after that prefix
        alone = init.clone()
        if offset:  # (at offset 0: the state the sequence started from)
            ref_delta.gated_delta_chunk(*(t[q[seq]:q[seq] + offset] for t in inputs), alone,
                                        batch([offset], [slots[seq]]), Kd ** -0.5)
        torch.testing.assert_close(pool[p], alone[slots[seq]], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["reference", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_conv_keeps_the_conv_states_in_its_launches(kind, dtype):
    """``mamba_conv1d(..., snapshots=)`` (``FusedOps.mamba_conv_state_saves``, plugin API 23):
    in a step with a decode first, x row-strided as the mixer passes it, offsets under the
    window (state columns from the slot), past it, at a sequence's start and end and two at
    one offset: the outputs, final states and snapshots bitwise what ``save_conv_states``
    before the plain conv gives; without ``snapshots`` the saves are not the op's."""
    conv = ops(kind)[0]
    g = torch.Generator().manual_seed(5)
    lens, slots, C, K = [1, 13, 2, 9], [3, 4, 0, 2], 12, 4
    saves = [(1, 2, 1), (1, 8, 3), (1, 13, 4), (3, 5, 0), (2, 0, 5), (1, 8, 6)]
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE, dtype)  # noqa: E731
    x = torch.cat([r(sum(lens), C), r(sum(lens), 5)], dim=1)[:, :C]  # rows strided
    w, bias, init = r(C, K), r(C), r(5, C, K - 1)

    def step(saves):
        b = batch(lens, slots, saves)
        b.num_decodes = 1
        return b

    state, pool = init.clone(), torch.zeros(7, C, K - 1, dtype=dtype, device=DEVICE)
    got = conv(x, w, bias, state, step(saves), "silu", snapshots=pool)
    ref_state, ref_pool = init.clone(), torch.zeros_like(pool)
    save_conv_states(x, ref_state, step(saves), ref_pool)
    want = conv(x, w, bias, ref_state, step(()), "silu")
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    torch.testing.assert_close(state, ref_state, rtol=0, atol=0)
    torch.testing.assert_close(pool, ref_pool, rtol=0, atol=0)
    assert pool.abs().sum(dim=(1, 2)).gt(0).sum() == len(saves)  # slot 2 named by none
    ignored = init.clone()
    torch.testing.assert_close(conv(x, w, bias, ignored, step(saves), "silu"), want,
                               rtol=0, atol=0)
    torch.testing.assert_close(ignored, ref_state, rtol=0, atol=0)
    if kind == "triton":
        with pytest.raises(ValueError, match="outside the batch"):
            conv(x, w, bias, init.clone(), step([(2, 3, 0)]), "silu", snapshots=pool)
        with pytest.raises(ValueError, match="snapshot pool"):
            conv(x, w, bias, init.clone(), step(saves), "silu", snapshots=pool[:, :, :2])
