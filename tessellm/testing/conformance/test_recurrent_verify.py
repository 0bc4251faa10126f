"""The verify ops of speculative decoding on recurrent layers (``FusedOps``' optional
``mamba_conv1d_verify``, ``mamba_state_update_verify``, ``gated_delta_verify``; without them the
engine composes each from the ops object's one-token op, and that composition is what runs
here) against the token-by-token recurrence: verify sequences of uneven lengths (a sampled token
and 1..5 drafts) in non-consecutive slots, their per-token states in spare slots, after a
prefill sequence or alone, and a batch padded as a captured verify step pads it (sequences of
the same length whose state and token slots are all one scratch slot: their outputs and that
slot are not checked), also as a captured verify step gives it (no host slot lists: ops that
declare ``recurrent_verify_graphs``, or the engine's composition). Each token's output and the state after each token (in its
``token_slots`` slot; the last one in the sequence's own slot) equal the recurrence's; slots the
step does not name stay untouched."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tessellm.backends.reference.gated_delta import sequential_gated_delta
from tessellm.backends.reference.mamba import sequential_scan
from tessellm.backends.reference.recurrent_verify import verify_ops, verify_ops_capturable
from tessellm.backends.spec import OpsSpec
from tessellm.core.mamba_state import make_batch

ATOL = 2e-4


@dataclass(frozen=True)
class Layout:
    """A verify step: ``lengths[i]`` tokens (1 + drafts) of sequence i in slot ``slots[i]``,
    its tokens but the last in ``spares[i]``; ``prefill``: a 3-token prefill sequence in slot
    ``4`` before them (its rows first); ``padding``: sequences after them, as long as the first,
    all in slot ``scratch``; ``total`` slots in all; ``captured``: the verify batch as a captured
    verify step has it (``MambaStateCache.verify_batch``: the host slot lists empty)."""

    lengths: tuple
    slots: tuple
    spares: tuple
    prefill: bool = True
    padding: int = 0
    scratch: int = 0
    total: int = 14
    captured: bool = False

    @property
    def token_slots(self) -> list:
        real = [s for spares, own in zip(self.spares, self.slots) for s in [*spares, own]]
        return real + [self.scratch] * (self.padding * self.lengths[0])

    @property
    def named(self) -> set:
        return set(self.slots) | {s for spares in self.spares for s in spares}

    def batch(self, device):
        counts = list(self.lengths) + [self.lengths[0]] * self.padding
        slots = list(self.slots) + [self.scratch] * self.padding
        verify = len(counts)
        if self.prefill:
            counts, slots = [3] + counts, [4] + slots
        batch = make_batch(counts, slots, device, verify, self.token_slots)
        if self.captured:
            batch.verifies.state_indices_host, batch.verifies.token_slots_host = [], []
        return batch


LAYOUTS = {
    "mixed": Layout((4, 2, 3), (6, 1, 3), ((8, 9, 10), (11,), (12, 13))),
    "k5": Layout((6, 6, 2), (2, 7, 5), ((8, 9, 10, 11, 12), (13, 14, 15, 16, 17), (18,)),
                 prefill=False, total=20),
    "padded": Layout((3, 3), (6, 1), ((8, 9), (10, 11)), padding=2, scratch=0, total=12),
    "captured": Layout((4, 4), (3, 7), ((8, 9, 10), (11, 12, 13)), prefill=False, padding=1,
                       scratch=0, captured=True),
}
LAYOUT = LAYOUTS["mixed"]


def _verify_batch(device):
    """A step of one prefill sequence (slot 4, 3 tokens) then the verify sequences."""
    return LAYOUT.batch(device)


def _ops(target, flag, layout=None):
    ops = target.registry.fused_ops(target.backend, OpsSpec(torch.float32))
    if ops is None or not getattr(ops, flag, False):
        pytest.skip(f"{target.name} does not declare {flag}")
    if layout is not None and layout.captured and not verify_ops_capturable(ops):
        pytest.skip(f"{target.name}'s own verify ops do not declare recurrent_verify_graphs")
    return ops


def _check_states(state, init, want_after, layout: Layout):
    """``want_after[i][j]``: sequence i's state after token j; every other slot (but a padded
    step's scratch slot) as it was."""
    for i, spares in enumerate(layout.spares):
        for j, slot in enumerate([*spares, layout.slots[i]]):
            torch.testing.assert_close(state[slot], want_after[i][j], atol=ATOL, rtol=ATOL)
    skip = layout.named | ({layout.scratch} if layout.padding else set())
    others = [s for s in range(layout.total) if s not in skip]
    torch.testing.assert_close(state[others], init[others])


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_mamba_verify_ops_keep_each_tokens_state(target, name):
    layout = LAYOUTS[name]
    ops = _ops(target, "supports_mamba2", layout)
    conv_op, ssm_op, _ = verify_ops(ops)
    dev = target.device
    g = torch.Generator().manual_seed(7)
    h, p, groups, n, width, c = 4, 8, 2, 16, 4, 24
    batch = layout.batch(dev).verifies
    t = len(layout.token_slots)  # rows, padding ones included
    # the conv: each token's window of the K - 1 inputs before it
    weight, bias = torch.randn(c, width, generator=g), torch.randn(c, generator=g)
    conv_init = torch.randn(layout.total, c, width - 1, generator=g)
    x = torch.randn(t, c, generator=g)
    conv_state = conv_init.clone().to(dev)
    got = conv_op(x.to(dev), weight.to(dev), bias.to(dev), conv_state, batch, "silu").cpu()
    row, after = 0, []
    for i, length in enumerate(layout.lengths):
        full = torch.cat([conv_init[layout.slots[i]].t(), x[row:row + length]])  # [K-1+L, C]
        y = F.conv1d(full.t()[None], weight[:, None, :], bias, groups=c)[0].t()
        torch.testing.assert_close(got[row:row + length], F.silu(y), atol=ATOL, rtol=ATOL)
        after.append([full[j + 1:j + width].t() for j in range(length)])
        row += length
    _check_states(conv_state.cpu(), conv_init, after, layout)
    # the SSM
    A, D, dt_bias = -torch.rand(h, generator=g) - 0.5, torch.randn(h, generator=g), torch.randn(h, generator=g)
    xs, dt = torch.randn(t, h, p, generator=g), torch.randn(t, h, generator=g)
    B, C = torch.randn(t, groups, n, generator=g), torch.randn(t, groups, n, generator=g)
    ssm_init = torch.randn(layout.total, h, p, n, generator=g) * 0.3
    ssm_state = ssm_init.clone().to(dev)
    got = ssm_op(*(v.to(dev) for v in (xs, dt, A, B, C, D, dt_bias)), ssm_state, batch,
                 (0.0, float("inf"))).cpu()
    assert got.shape == xs.shape and got.dtype == xs.dtype
    row, after = 0, []
    for i, length in enumerate(layout.lengths):
        states, state = [], ssm_init[layout.slots[i]]
        for j in range(row, row + length):
            y, state = sequential_scan(xs[j:j + 1], dt[j:j + 1], A, B[j:j + 1], C[j:j + 1], D,
                                       dt_bias, state)
            torch.testing.assert_close(got[j], y[0], atol=ATOL, rtol=ATOL)
            states.append(state)
        after.append(states)
        row += length
    _check_states(ssm_state.cpu(), ssm_init, after, layout)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_gated_delta_verify_keeps_each_tokens_state(target, name):
    layout = LAYOUTS[name]
    ops = _ops(target, "supports_gated_delta", layout)
    delta_op = verify_ops(ops)[2]
    dev = target.device
    g = torch.Generator().manual_seed(8)
    hk, hv, k, v = 2, 4, 16, 12
    t = len(layout.token_slots)
    q, key = torch.randn(t, hk, k, generator=g), torch.randn(t, hk, k, generator=g)
    val, gate, beta = torch.randn(t, hv, v, generator=g), -torch.rand(t, hv, generator=g), torch.rand(t, hv, generator=g)
    init = torch.randn(layout.total, hv, k, v, generator=g) * 0.3
    state = init.clone().to(dev)
    scale = k ** -0.5
    got = delta_op(*(a.to(dev) for a in (q, key, val, gate, beta)), state,
                   layout.batch(dev).verifies, scale).cpu()
    assert got.shape == val.shape and got.dtype == val.dtype
    row, after = 0, []
    for i, length in enumerate(layout.lengths):
        states, s = [], init[layout.slots[i]]
        for j in range(row, row + length):
            o, s = sequential_gated_delta(q[j:j + 1], key[j:j + 1], val[j:j + 1], gate[j:j + 1],
                                          beta[j:j + 1], s, scale)
            torch.testing.assert_close(got[j], o[0], atol=ATOL, rtol=ATOL)
            states.append(s)
        after.append(states)
        row += length
    _check_states(state.cpu(), init, after, layout)


def test_verify_batch_layout(target):
    """``make_batch``'s verify part: rows after the others, 0-based, the token slots given."""
    batch = _verify_batch(target.device)
    assert batch.query_start_loc_host == [0, 3] and batch.state_indices_host == [4]
    ver = batch.verifies
    assert ver.query_start_loc_host == [0, 4, 6, 9] and ver.state_indices_host == list(LAYOUT.slots)
    assert ver.token_slots_host == [8, 9, 10, 6, 11, 1, 12, 13, 3]
    assert ver.token_slots.cpu().tolist() == ver.token_slots_host
