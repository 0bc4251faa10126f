"""States saved inside a prefill step (``MambaBatch.state_saves``), composed from any recurrent
op that runs whole sequences from their state slots (``mamba_conv1d``, ``mamba_chunk_scan``,
``gated_delta_chunk``).

Recurrent-state prefix caching keeps the state at block boundaries (core/state_prefix.py). A
boundary inside a sequence's chunk is served by running the op once per piece of the
sequences between their save offsets, each piece continuing from the state the last left in
the slot, and copying that state into the snapshot slot after the piece that ends there::

    sequence s: 10 tokens, save at offset 4 into snapshot 7
    pieces:     [t0 .. t3] -> slot of s, copied to pool[7]   [t4 .. t9] -> slot of s
    one op call per round: round r runs piece r of every sequence that has one

The op is a function of (its inputs, the slot's state) to (its outputs, the new state), so the
pieces give what one call over the whole sequence gives (up to the op's float rounding: a
chunked scan's chunks start at the piece's first token).

Plain torch (no Triton, nothing of the engine or the contract: a ``MambaBatch``'s pieces are
made with ``dataclasses.replace``), so the layers use it for any backend's ops that do not keep
the saves themselves; the pure-torch reference re-exports it
(``backends/reference/state_saves.py``). The Triton ops keep them in one pass (plugin API 21 /
22 / 23): the sequential Mamba scan and the gated delta chunk kernel read ``save_plan`` (below), a
chunk ending at each offset and its state stored into the snapshot slot; the SSD kernels start
a chunk at each offset (``kernels/mamba/ssd.py``); the causal conv's state launch stores each
save's window (``kernels/mamba/conv1d.py``).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence

import torch


def run_with_saves(op: Callable, inputs: Sequence[torch.Tensor], batch,
                   pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``op(inputs, batch)`` (each input ``[T, ...]`` over the batch's rows; returns ``[T,
    ...]``) with ``batch.state_saves`` served: ``pairs`` are the (state, snapshot pool) tensors
    the op leaves each slot's state in (a conv state and its pool, or an SSM state and its).
    The rounds are planned once per step (``MambaBatch.pieces``), shared by every layer."""
    if not batch.state_saves:
        return op(inputs, batch)
    if batch.pieces is None:
        batch.pieces = plan(batch)
    rounds, order = batch.pieces
    outs = []
    for ranges, sub, saves in rounds:
        rows = [t[ranges[0][0]:ranges[0][1]] if len(ranges) == 1
                else torch.cat([t[a:b] for a, b in ranges]) for t in inputs]
        outs.append(op(rows, sub))
        if saves:
            dst = [pool[p] for state, pool in pairs for _, p in saves]
            src = [state[s] for state, pool in pairs for s, _ in saves]
            torch._foreach_copy_(dst, src)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order is None:
        return out
    result = torch.empty_like(out)
    result[order] = out
    return result


def plan(batch) -> tuple[list, Optional[torch.Tensor]]:
    """The rounds that serve ``batch.state_saves``: per round, the row ranges of the pieces it
    runs, their ``MambaBatch`` (each piece a sequence in its request's slot) and the (state
    slot, snapshot slot) copies after it; and the rows' order in the rounds' outputs as an
    index (None when it is the batch's own: one sequence, or its pieces in row order)."""
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    cuts: dict[int, list[tuple[int, int]]] = {}
    for seq, offset, pool_slot in batch.state_saves:
        cuts.setdefault(seq, []).append((offset, pool_slot))
    pieces = []  # per sequence: [(first row, end row, snapshot slot after it or None), ...]
    for s in range(len(slots)):
        a, seq_pieces = qsl[s], []
        for offset, pool_slot in sorted(cuts.get(s, ())):
            seq_pieces.append((a, qsl[s] + offset, pool_slot))
            a = qsl[s] + offset
        seq_pieces.append((a, qsl[s + 1], None))
        pieces.append(seq_pieces)
    device = batch.query_start_loc.device
    rounds, order = [], []
    for r in range(max(len(p) for p in pieces)):
        seqs = [s for s in range(len(slots)) if r < len(pieces[s])]
        ranges = [pieces[s][r][:2] for s in seqs]
        q = [0]
        for a, b in ranges:
            q.append(q[-1] + b - a)
        sub_slots = [slots[s] for s in seqs]
        sub = replace(batch, query_start_loc=torch.tensor(q, dtype=torch.int32).to(
                          device, non_blocking=True),
                      state_indices=torch.tensor(sub_slots, dtype=torch.int32).to(
                          device, non_blocking=True),
                      num_decodes=0, query_start_loc_host=q, state_indices_host=sub_slots,
                      prefills=None, verifies=None, state_saves=[], pieces=None)
        saves = [(slots[s], pieces[s][r][2]) for s in seqs if pieces[s][r][2] is not None]
        rounds.append((ranges, sub, saves))
        order += [i for a, b in ranges for i in range(a, b)]
    if order == list(range(len(order))):
        return rounds, None
    return rounds, torch.tensor(order, dtype=torch.long).to(device, non_blocking=True)


def save_conv_states(x: torch.Tensor, conv_state: torch.Tensor, batch, pool: torch.Tensor) -> None:
    """The conv states ``batch.state_saves`` ask for, straight from the conv's input: the state
    after a sequence's first ``offset`` tokens is the ``K - 1`` inputs before that token (older
    state first where ``offset < K - 1``), so no conv runs twice. ``x [T, C]`` (rows may be
    strided), ``conv_state [slots, C, K - 1]`` and ``pool [S, C, K - 1]``; call it before the
    conv op (which overwrites each slot's state)."""
    width = conv_state.shape[-1]
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    dst, src = [], []
    for seq, offset, pool_slot in batch.state_saves:
        a = qsl[seq]
        if offset >= width:
            window = x[a + offset - width:a + offset].t()
        else:
            window = torch.cat([conv_state[slots[seq]][:, offset:],
                                x[a:a + offset].t().to(conv_state.dtype)], dim=1)
        dst.append(pool[pool_slot])
        src.append(window)
    if dst:
        torch._foreach_copy_(dst, src)


class SavePlan:
    """A step's saves (``MambaBatch.state_saves``) as the sequential scan kernels and the conv
    read them (``kernels/mamba/chunk_scan.py``, ``kernels/gated_delta/chunk.py``,
    ``kernels/mamba/conv1d.py``), on the device (one
    int32 upload a step): per sequence the first of its saves (``first [seqs + 1]``), and per
    save its offset and snapshot slot, each sequence's in offset order."""

    def __init__(self, batch, device: torch.device, op: str):
        qsl = batch.query_start_loc_host
        per: list[list[tuple[int, int]]] = [[] for _ in range(len(qsl) - 1)]
        for seq, offset, pool_slot in batch.state_saves:
            if not 0 <= seq < len(per) or not 0 <= offset <= qsl[seq + 1] - qsl[seq]:
                raise ValueError(f"{op}: state save {(seq, offset, pool_slot)} "
                                 f"is outside the batch's sequences (lengths "
                                 f"{[b - a for a, b in zip(qsl[:-1], qsl[1:])]}).")
            per[seq].append((offset, pool_slot))
        first, offsets, slots = [0], [], []
        for saves in per:
            for offset, pool_slot in sorted(saves):
                offsets.append(offset)
                slots.append(pool_slot)
            first.append(len(offsets))
        views = []
        flat: list[int] = []
        for values in (first, offsets, slots):  # each view 16-byte aligned
            flat += [0] * (-len(flat) % 4)
            views.append((len(flat), len(flat) + len(values)))
            flat += values
        both = torch.tensor(flat, dtype=torch.int32).to(device, non_blocking=True)
        self.first, self.offsets, self.slots = (both[a:b] for a, b in views)


def save_plan(batch, op: str) -> SavePlan:
    """The step's saves, made by its first recurrent layer and kept on the batch (as the SSD
    kernels' ``_chunks``: one upload a step), keyed by the sequence bounds and the saves.
    ``op`` names the caller in the error for a save outside its sequence."""
    key = (tuple(batch.query_start_loc_host), tuple(batch.state_saves))
    made = getattr(batch, "_scan_saves", None)
    if made is None or made[0] != key:
        made = (key, SavePlan(batch, batch.query_start_loc.device, op))
        batch._scan_saves = made
    return made[1]


def save_pointers(batch, snapshots, state, op: str) -> tuple:
    """A scan kernel's save arguments ``(snapshot pool, first save per sequence, offsets,
    slots)`` when the batch names in-pass saves (``batch.state_saves``), the pool checked
    against the ``state`` slots; otherwise placeholders the kernel never reads (SAVES off)."""
    saves = getattr(batch, "state_saves", None)
    if not saves:
        qsl = batch.query_start_loc
        return state, qsl, qsl, qsl
    if snapshots is None:
        raise ValueError(f"{op}: the batch names state saves but no snapshot pool was given "
                         "(snapshots=).")
    if snapshots.shape[1:] != state.shape[1:] or not snapshots.is_contiguous():
        raise ValueError(f"{op}: the snapshot pool {tuple(snapshots.shape)} must be contiguous "
                         f"and shaped as the state slots {tuple(state.shape[1:])}.")
    plan = save_plan(batch, op)
    return snapshots, plan.first, plan.offsets, plan.slots
