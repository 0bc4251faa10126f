"""n-gram (prompt lookup) proposer: drafts the tokens that followed the latest earlier
occurrence of the request's own suffix, in its prompt + output. No model.

Vectorised over the batch: the histories live in one persistent int32 array (a row per
request, the runner's block-table row), appended with each step's accepted tokens; the search
runs on a ``[B, W]`` slice of it (``W`` the longest history) with numpy, one pass per n-gram
length, no Python loop per request::

    history:  a b c d e b c d      (L = 8, suffix "b c d", n = 3)
    E_1:      . . . X . . . X      columns equal to the last token (d)
    E_2:      . . . X . . . X      ... and the token before equal to the one before it (c)
    E_3:      . . . X . . . X      ... (b); valid ends j <= L - 2 -> j = 3
    drafts:   e b c ...            the k tokens after j (at most up to the end)

The longest n in [prompt_lookup_min, prompt_lookup_max] with a match wins; among its matches
the latest (most recent) one.
"""

from __future__ import annotations

import numpy as np

from tessellm.spec_decode.proposer import Proposal, ProposeInput, Proposer, ProposerContext


class NgramProposer(Proposer):
    def __init__(self, ctx: ProposerContext):
        super().__init__(ctx)
        self.k = self.config.num_speculative_tokens
        self.nmin = self.config.prompt_lookup_min
        self.nmax = self.config.prompt_lookup_max
        self.history = NgramHistory(ctx.max_model_len + self.k + 1)

    def propose(self, inp: ProposeInput) -> Proposal:
        self.history.update(inp)
        out = Proposal()
        if inp.max_drafts <= 0:
            return out
        ids = [rid for rid in inp.order if rid in inp.sampled]
        if not ids:
            return out
        rows = np.fromiter((self.history.row_of[rid] for rid in ids), dtype=np.int64, count=len(ids))
        drafts, counts = propose_ngram(self.history.tokens, self.history.lens, rows, self.nmin,
                                       self.nmax, min(self.k, inp.max_drafts))
        for rid, row, n in zip(ids, drafts.tolist(), counts.tolist()):  # two host copies in all
            if n:
                out.token_ids[rid] = row[:n]
        return out

    def remove_requests(self, request_ids) -> None:
        self.history.remove(request_ids)


class NgramHistory:
    """Each request's tokens (prompt + accepted output) in a row of one int32 array."""

    def __init__(self, width: int):
        self.width = width
        self.tokens = np.zeros((8, width), dtype=np.int32)
        self.lens = np.zeros(8, dtype=np.int64)
        self.row_of: dict[str, int] = {}
        self.free_rows: list[int] = list(range(7, -1, -1))

    def update(self, inp: ProposeInput) -> None:
        """Take in the step's accepted tokens (a new request: its whole history, once)."""
        for rid, state in zip(inp.order, inp.states):
            row = self.row_of.get(rid)
            if row is None:
                row = self._add(rid)
                n = len(state.token_ids)
                self.tokens[row, :n] = state.token_ids
                self.lens[row] = n
                continue
            new = inp.sampled.get(rid)
            if new:
                n = int(self.lens[row])
                self.tokens[row, n:n + len(new)] = new
                self.lens[row] = n + len(new)

    def _add(self, rid: str) -> int:
        if not self.free_rows:
            old = self.tokens.shape[0]
            self.tokens = np.concatenate([self.tokens, np.zeros_like(self.tokens)])
            self.lens = np.concatenate([self.lens, np.zeros_like(self.lens)])
            self.free_rows = list(range(2 * old - 1, old - 1, -1))
        row = self.free_rows.pop()
        self.row_of[rid] = row
        return row

    def remove(self, request_ids) -> None:
        for rid in request_ids:
            row = self.row_of.pop(rid, None)
            if row is not None:
                self.lens[row] = 0
                self.free_rows.append(row)


def propose_ngram(tokens: np.ndarray, lens: np.ndarray, rows: np.ndarray, nmin: int, nmax: int,
                  k: int) -> tuple[np.ndarray, np.ndarray]:
    """Drafts ``[B, k]`` and their counts ``[B]`` (0: no match) for the histories
    ``tokens[rows, :lens[rows]]`` (see the module docstring).

    Candidates only: the columns equal to the suffix's last token (one ``[B, W]`` compare), then
    for each candidate its ``nmax`` tokens back against the suffix's (``[C, nmax]``): the run of
    equal ones is the longest n-gram ending there. Per row the longest run (at least ``nmin``)
    wins, the latest column among equals: one scattered max of ``run * W + column``."""
    length = lens[rows]
    num = len(rows)
    width = int(length.max()) if num else 0
    drafts = np.zeros((num, k), dtype=tokens.dtype)
    counts = np.zeros(num, dtype=np.int64)
    if width < 2:
        return drafts, counts
    hist = tokens[rows, :width]  # [B, W], a copy
    back = np.arange(nmax)
    # [B, nmax], last first; a column below 0 reads column 0 instead, only where no match can
    # reach (below); clipped, not wrapped: the batch's longest row may be shorter than nmax
    suffix = hist[np.arange(num)[:, None], np.maximum((length - 1)[:, None] - back, 0)]
    hist[np.arange(num), length - 1] = -1  # the suffix's own end is no match (a token must follow one)
    if length.min() != width:  # past a shorter row's end: no match either
        hist[np.arange(width)[None, :] >= length[:, None]] = -1
    r, j = np.nonzero(hist == suffix[:, :1])
    if not len(r):
        return drafts, counts
    # run i of a candidate ending at j <= L - 2 reads columns j - i >= 0, so suffix columns
    # L - 1 - i >= 1: never a clipped one; columns j - i < 0 are clipped too and masked here
    cols = j[:, None] - back  # [C, nmax]
    equal = (hist[r[:, None], np.maximum(cols, 0)] == suffix[r]) & (cols >= 0)
    key = np.logical_and.accumulate(equal, axis=1).sum(axis=1) * width + j
    best = np.zeros(num, dtype=np.int64)  # per row: longest run * W + its latest column
    np.maximum.at(best, r, key)
    row = np.flatnonzero(best >= nmin * width)  # the longest run is at least nmin
    start = best[row] % width + 1
    counts[row] = np.minimum(k, length[row] - start)
    # not hist: its suffix end is overwritten
    drafts[row] = tokens[rows[row][:, None], np.minimum(start[:, None] + np.arange(k), width - 1)]
    return drafts, counts
