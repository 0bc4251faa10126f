"""The verify ops of speculative decoding on models with recurrent states (Mamba2 mixers, gated
DeltaNet) in pure torch: the oracle for the conformance suite, the ``ReferenceOps`` members, and
what the engine composes from a backend's own one-token ops when it lacks them
(``FusedOps.*_verify``, ``backends/spec.py``).

A verify sequence carries ``L = 1 + k`` tokens: the last sampled token and ``k`` drafts. A
recurrent state cannot give a rejected draft back, so these ops keep the state after *each*
token, each in a slot of its own (``MambaBatch.token_slots``); once the drafts are checked the
engine keeps the one after the accepted prefix (``core/mamba_state.py``)::

    tokens:        t0   t1   t2   t3         (L = 4: a sampled token and three drafts)
    token_slots:   h0   h1   h2   m          the state after t_j -> its slot; the last -> the
                                              sequence's own slot m (the start state, read first)
    2 drafts accepted -> the engine copies slot h2 (the state after t2) to m; all 3: m is right

The outputs are those of the one-token ops run token after token (the decode path), so the
verify step's logits round exactly as decoding one token at a time does. The ops run the
recurrence one token *position* at a time, batched over the sequences (``positions``).
"""

from __future__ import annotations

from functools import partial

import torch

from tessellm.backends.reference.gated_delta import gated_delta_step
from tessellm.backends.reference.mamba import _conv1d_decodes, selective_state_update
from tessellm.kernels import op_flags


def verify_positions(qsl: list[int], slots: list[int], token_slots: list[int],
                     device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per token position ``j``: ``(rows, src, dst)`` int64 tensors over the sequences longer
    than ``j``: their row ``j``, the slot holding the state before it (``slots`` for j = 0,
    else the previous token's slot) and the slot receiving the state after it."""
    lengths = [qsl[i + 1] - qsl[i] for i in range(len(slots))]
    out = []
    for j in range(max(lengths, default=0)):
        seqs = [i for i, n in enumerate(lengths) if n > j]
        rows = [qsl[i] + j for i in seqs]
        src = [slots[i] if j == 0 else token_slots[qsl[i] + j - 1] for i in seqs]
        dst = [token_slots[r] for r in rows]
        out.append(tuple(torch.tensor(v, dtype=torch.long).to(device, non_blocking=True)
                         for v in (rows, src, dst)))
    return out


def captured_positions(state_indices: torch.Tensor, token_slots: torch.Tensor,
                       length: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """``verify_positions`` of a captured verify step (``MambaStateCache.verify_batch``): every
    sequence ``length`` tokens long, the slots on the device only, so the indices are built
    there (device ops a graph can hold, no host list read)."""
    base = torch.arange(state_indices.shape[0], device=state_indices.device) * length
    slots, out = token_slots.long(), []
    for j in range(length):
        rows = base + j
        src = state_indices.long() if j == 0 else slots[rows - 1]
        out.append((rows, src, slots[rows]))
    return out


def positions(batch) -> list:
    """The batch's per-position indices (``MambaBatch.positions``, built here when absent)."""
    if batch.positions is None:
        qsl = batch.query_start_loc_host
        if batch.state_indices_host or len(qsl) < 2:
            batch.positions = verify_positions(qsl, batch.state_indices_host,
                                               batch.token_slots_host, batch.state_indices.device)
        else:  # a captured verify step: no host slots, sequences of one length
            batch.positions = captured_positions(batch.state_indices, batch.token_slots,
                                                 qsl[1] - qsl[0])
    return batch.positions


def _per_token(step, states: tuple, batch, out: torch.Tensor, inputs: tuple) -> torch.Tensor:
    """Run ``step(*inputs at the position's rows, dst slots)`` position by position; before
    each, every state tensor's src slots are copied to the dst slots (the step then advances
    the dst slots in place)."""
    for rows, src, dst in positions(batch):
        for state in states:
            state.index_copy_(0, dst, state.index_select(0, src))
        out[rows] = step(*(t[rows] for t in inputs), dst)
    return out


def mamba_conv1d_verify(x, weight, bias, conv_state, batch, activation="silu") -> torch.Tensor:
    """``mamba_conv1d`` over a verify batch: ``x [T, C]``; the conv state (the last ``K - 1``
    inputs) after each token goes to its ``token_slots`` slot. Returns ``[T, C]``."""
    def step(xs, dst):
        return _conv1d_decodes(xs, weight, bias, conv_state, dst, activation)

    return _per_token(step, (conv_state,), batch, torch.empty_like(x), (x,))


def mamba_state_update_verify(x, dt, A, B, C, D, dt_bias, ssm_state, batch,
                              dt_limit=(0.0, float("inf")), step=selective_state_update):
    """``mamba_state_update`` over a verify batch: ``x [T, H, P]``, ``dt [T, H]``, ``B, C
    [T, G, N]``; the SSM state after each token goes to its ``token_slots`` slot. ``step``: the
    one-token op to compose (the engine passes the backend's own). Returns ``y [T, H, P]``."""
    def one(xs, dts, bs, cs, dst):
        return step(xs, dts, A, bs, cs, D, dt_bias, ssm_state, dst, dt_limit)

    return _per_token(one, (ssm_state,), batch, torch.empty_like(x), (x, dt, B, C))


def gated_delta_verify(q, k, v, g, beta, state, batch, scale: float, step=gated_delta_step):
    """``gated_delta_step`` over a verify batch: ``q, k [T, Hk, K]``, ``v [T, Hv, V]``,
    ``g, beta [T, Hv]``; the state after each token goes to its ``token_slots`` slot.
    ``step``: the one-token op to compose. Returns ``o [T, Hv, V]``."""
    def one(qs, ks, vs, gs, bs, dst):
        return step(qs, ks, vs, gs, bs, state, dst, scale)

    return _per_token(one, (state,), batch, torch.empty_like(v), (q, k, v, g, beta))


VERIFY_OPS = op_flags.VERIFY_OPS


def verify_ops_capturable(ops) -> bool:
    """Whether a captured verify step may run the ops' verify ops: the composition here (no op
    of its own: its indices are built on the device, ``captured_positions``) or own ops
    declared to read no host list (``FusedOps.recurrent_verify_graphs``, ``backends/spec.py``)."""
    own = any(getattr(ops, name, None) is not None for name in VERIFY_OPS)
    return not own or bool(getattr(ops, "recurrent_verify_graphs", False))


def verify_ops(ops) -> tuple:
    """``(conv, ssm or None, gated delta or None)``: the ops object's own verify ops, else
    these composed from its one-token ops (None where it has no such family)."""
    conv = getattr(ops, "mamba_conv1d_verify", None) or mamba_conv1d_verify
    ssm = getattr(ops, "mamba_state_update_verify", None)
    if ssm is None and hasattr(ops, "mamba_state_update"):
        ssm = partial(mamba_state_update_verify, step=ops.mamba_state_update)
    delta = getattr(ops, "gated_delta_verify", None)
    if delta is None and hasattr(ops, "gated_delta_step"):
        delta = partial(gated_delta_verify, step=ops.gated_delta_step)
    return conv, ssm, delta
