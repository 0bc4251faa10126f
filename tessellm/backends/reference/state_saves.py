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
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch


def run_with_saves(op: Callable, inputs: Sequence[torch.Tensor], batch,
                   pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """``op(inputs, batch)`` (each input ``[T, ...]`` over the batch's rows; returns ``[T,
    ...]``) with ``batch.state_saves`` served: ``pairs`` are the (state, snapshot pool) tensors
    the op leaves each slot's state in (a conv state and its pool, or an SSM state and its)."""
    from tessellm.backends.spec import MambaBatch

    saves = batch.state_saves
    if not saves:
        return op(inputs, batch)
    qsl, slots = batch.query_start_loc_host, batch.state_indices_host
    cuts: dict[int, list[tuple[int, int]]] = {}
    for seq, offset, pool_slot in saves:
        cuts.setdefault(seq, []).append((offset, pool_slot))
    # per sequence: its pieces [(first row, end row, pool slot after it or None), ...]
    pieces = []
    for s in range(len(slots)):
        a, b = qsl[s], qsl[s + 1]
        seq_pieces = []
        for offset, pool_slot in sorted(cuts.get(s, ())):
            seq_pieces.append((a, qsl[s] + offset, pool_slot))
            a = qsl[s] + offset
        seq_pieces.append((a, b, None))
        pieces.append(seq_pieces)
    device = batch.query_start_loc.device
    outs, order = [], []
    for r in range(max(len(p) for p in pieces)):
        seqs = [s for s in range(len(slots)) if r < len(pieces[s]) and pieces[s][r][1] > pieces[s][r][0]]
        if not seqs:
            continue
        ranges = [pieces[s][r][:2] for s in seqs]
        rows = [t[ranges[0][0]:ranges[0][1]] if len(ranges) == 1
                else torch.cat([t[a:b] for a, b in ranges]) for t in inputs]
        q = [0]
        for a, b in ranges:
            q.append(q[-1] + b - a)
        sub_slots = [slots[s] for s in seqs]
        sub = MambaBatch(torch.tensor(q, dtype=torch.int32, device=device),
                         torch.tensor(sub_slots, dtype=torch.int32, device=device), 0, q, sub_slots)
        outs.append(op(rows, sub))
        order += [i for a, b in ranges for i in range(a, b)]
        dst, src = [], []
        for s in seqs:
            pool_slot = pieces[s][r][2]
            if pool_slot is not None:
                for state, pool in pairs:
                    dst.append(pool[pool_slot])
                    src.append(state[slots[s]])
        if dst:
            torch._foreach_copy_(dst, src)
    out = torch.cat(outs) if len(outs) > 1 else outs[0]
    if order == list(range(len(order))):
        return out
    result = torch.empty_like(out)
    result[torch.tensor(order, dtype=torch.long, device=out.device)] = out
    return result
