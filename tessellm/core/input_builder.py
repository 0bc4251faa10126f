"""One builder for a step's flat inputs, on the host (numpy); eager and graph steps share it.

Per step, for requests ordered decodes first (one query token each)::

    request:         A (decode)    B (prefill chunk, 3 tokens, 5 cached)   C (1 token + 2 drafts)
    input_ids:       [a9]          [b5 b6 b7]                              [c4 d0 d1]
    positions:       [9]           [5  6  7 ]                              [4  5  6 ]
    slot_mapping:    [slot(A,9)]   [slot(B,5) slot(B,6) slot(B,7)]         ...   slot = table[r, p // bs] * bs + p % bs
    query_start_loc: 0             1                                       4                  7
    seq_lens:        10            8                                       7
    logits_indices:  [0]           []  (B's prompt goes on next step)      [4 5 6]  (k+1 = 3 rows)
    sample_start:    0             1                                       1                  4

A request's sampled rows are the last ``num_sampled`` of its tokens; the sampler sees only
those rows, request after request (``sample_start`` is each request's first one). A captured
graph replays a pure-decode step padded to its size: ``pad`` appends rows that read nothing
(slot -1, length 0), to what this builder built.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from tessellm.core.block_table import PersistentBlockTable
from tessellm.core.input_batch import RunnerRequest


@dataclass
class HostInputs:
    input_ids: np.ndarray  # int64 [T]; rows in ``feed`` are filled on the device
    positions: np.ndarray  # int64 [T]
    slot_mapping: np.ndarray  # int64 [T]; -1 = padding, writes nothing
    seq_lens: np.ndarray  # int32 [S]: context + this step's queries
    query_start_loc: np.ndarray  # int32 [S + 1]
    block_table: np.ndarray  # int32 [S, widest table of the step]
    logits_indices: np.ndarray  # int64 [R]: the token rows that are sampled
    sample_start: Sequence[int]  # [S + 1]: request i's sampled rows are sample_start[i]:[i + 1]
    feed: list[tuple[int, int]]  # (token row, row in the last step's sampled ids): async inputs
    num_decodes: int  # the first num_decodes requests have one query token
    all_decode: bool  # every request has one query token (a graph may replay the step)
    prompt_lp_rows: list[tuple[RunnerRequest, int, int, int]]  # (state, first row, start, n)
    any_prompt_logprobs: bool  # the step computes prompt rows (prompt_lp_rows): no graph replay then

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def pad(self, size: int) -> list[np.ndarray]:
        """The graph inputs (ids, positions, slots, seq lens, table) padded to ``size`` rows."""
        n = self.num_tokens
        out = [np.zeros(size, dtype=np.int64), np.zeros(size, dtype=np.int64),
               np.full(size, -1, dtype=np.int64), np.zeros(size, dtype=np.int32),
               np.zeros((size, self.block_table.shape[1]), dtype=np.int32)]
        for dst, src in zip(out, (self.input_ids, self.positions, self.slot_mapping, self.seq_lens,
                                  self.block_table)):
            dst[:n] = src
        return out


InputToken = Callable[[RunnerRequest, int, int, list], int]


def build_inputs(states: list[RunnerRequest], counts: list[int], num_sampled: Optional[list[int]],
                 tables: PersistentBlockTable, block_size: int, input_token: InputToken,
                 width_multiple: int = 1, prompt_rows: bool = True) -> HostInputs:
    """``num_sampled``: rows each request samples; None when every request samples one (the
    usual decode step: it takes a fast path with no per-request Python beyond the token ids).
    ``input_token(state, pos, row, feed)`` gives a token the host has not seen (async).
    ``width_multiple``: the block table's columns are the step's widest table rounded up to a
    multiple of it (at most the whole table), e.g. 16 for the kernel's
    ``table_width_multiple``. ``prompt_rows`` False: no request needs logits at prompt rows
    (``InputBatch.with_prompt_rows`` empty), so none is looked at."""
    s = len(states)
    c = np.fromiter((st.num_computed_tokens for st in states), dtype=np.int64, count=s)
    rows = np.fromiter((st.row for st in states), dtype=np.int64, count=s)
    all_decode = sum(counts) == s
    feed: list[tuple[int, int]] = []
    if all_decode:
        n = 1
        qsl = np.arange(s + 1, dtype=np.int32)
        positions, req_of_token = c.copy(), np.arange(s)
        ids = np.fromiter([st.token_ids[st.num_computed_tokens] if st.num_computed_tokens < len(st.token_ids)
                           else input_token(st, st.num_computed_tokens, i, feed)
                           for i, st in enumerate(states)], dtype=np.int64, count=s)
    else:
        n = np.asarray(counts, dtype=np.int64)
        qsl = np.zeros(s + 1, dtype=np.int32)
        np.cumsum(n, out=qsl[1:])
        positions = np.arange(int(qsl[-1]), dtype=np.int64) - np.repeat(qsl[:-1] - c, n)
        req_of_token = np.repeat(np.arange(s), n)
        ids = _input_ids(states, counts, qsl, input_token, feed)
    width = int(tables.num_blocks[rows].max())
    if width_multiple > 1:
        width = min(-(-width // width_multiple) * width_multiple, tables.table.shape[1])
    table = tables.table[rows, :width]
    slots = table[req_of_token, positions // block_size].astype(np.int64) * block_size
    slots += positions % block_size
    if num_sampled is None:
        logits_indices, sample_start = qsl[1:].astype(np.int64) - 1, range(s + 1)
    else:
        logits_indices, sample_start = _sampled(qsl, num_sampled)
    plp = [i for i, st in enumerate(states) if st.params.needs_prompt_rows] if prompt_rows else []
    lp_rows = _prompt_logprob_rows(states, counts, qsl, plp) if plp else []
    # only a step that computes prompt rows needs the hidden states (no graph replay): a request
    # past its prompt no longer keeps the batch's decode steps off the graphs
    return HostInputs(ids, positions, slots, (c + n).astype(np.int32), qsl, table, logits_indices,
                      sample_start, feed, _num_decodes(counts), all_decode, lp_rows, bool(lp_rows))


def _sampled(qsl: np.ndarray, num_sampled: list[int]) -> tuple[np.ndarray, list[int]]:
    """Each request's last ``num_sampled`` token rows, and where its rows start."""
    sampled = np.asarray(num_sampled, dtype=np.int64)
    start = np.zeros(len(num_sampled) + 1, dtype=np.int64)
    np.cumsum(sampled, out=start[1:])
    num_rows = int(start[-1])
    indices = (np.repeat(qsl[1:] - sampled, sampled)
               + np.arange(num_rows) - np.repeat(start[:-1], sampled))
    return indices, start.tolist()


def _input_ids(states, counts, qsl, input_token: InputToken, feed) -> np.ndarray:
    flat: list[int] = []  # one host array at the end, not one per request
    for i, (st, n) in enumerate(zip(states, counts)):
        c = st.num_computed_tokens
        known = st.token_ids[c:c + n]
        if len(known) < n and st.spec_token_ids:  # the last known token, then the drafts
            flat += known
            flat += st.spec_token_ids[:n - len(known)]
        elif len(known) < n:  # a decode whose input the last step sampled
            flat.append(input_token(st, c, int(qsl[i]), feed))
        else:
            flat += known
    return np.array(flat, dtype=np.int64)


def _num_decodes(counts: list[int]) -> int:
    """Decodes sort first: count the leading one-token requests."""
    if counts[0] != 1:
        return 0
    if counts[-1] == 1:
        return len(counts)
    return next(i for i, n in enumerate(counts) if n != 1)


def _prompt_logprob_rows(states, counts, qsl, plp: list[int]) -> list:
    """(state, first hidden row, first prompt position, rows) of the prompt rows this step
    computes that need logits: every one for prompt logprobs, those from
    ``prompt_logprob_start`` for prefill scoring alone."""
    rows = []
    for i in plp:
        st, n = states[i], counts[i]
        c, p = st.num_computed_tokens, st.num_prompt_tokens
        lo = c if st.params.prompt_logprobs is not None else max(c, st.params.prompt_logprob_start or 0)
        hi = min(c + n, p - 1)
        if lo < hi:
            rows.append((st, int(qsl[i]) + lo - c, lo, hi - lo))
    return rows
