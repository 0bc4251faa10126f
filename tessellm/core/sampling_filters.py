"""Top-k and top-p as *candidate sets*: per row, the few tokens it may still sample, found
without sorting the whole vocabulary wherever that gives the same set.

Invariant: a filtered row keeps a *prefix* of its tokens sorted by logit, descending. Top-k
keeps ``k``; top-p keeps a token while the probability mass strictly before it (after top-k)
is below ``p``; the most likely token is always kept. The reference, ``filter_dense``, sorts all
``V`` tokens of every row (a row of 49,152 costs ~3 ms on a CPU core). ``filter_candidates``
answers each row from its ``c`` largest tokens (``topk``: one pass over the row) whenever that
prefix provably holds the row's whole kept set, and widens (``c`` = 64, 1,024, 4,096, then the
full sort) only the rows it cannot prove::

    sorted row  [ t0 t1 ... t(c-2) t(c-1) | t(c) ... t(V-1) ]
                  <------- candidates ------->  all dropped when top_k <= c, or when the
                                                mass before t(c-1) is already >= top_p

Values are the reference's (the same temperature-scaled logits, the same masking rule); only
top-p's mass is summed in another order (the row's normaliser over the vocabulary in its own
order instead of in sorted order), so a token whose preceding mass lies within float32
rounding of ``top_p`` may be kept by one and not the other. Rows are proved with a margin of
``_TOP_P_MARGIN`` above that rounding. Tokens of equal logit may be ordered differently by
``topk`` and ``sort`` (the reference's own order among ties is unspecified).

Tensors in, tensors out; a data-dependent choice (which rows widen) reads a tensor on the host,
so ``filter_candidates`` is for host-resident logits (the caller decides).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

# Candidate widths tried in turn before a row falls back to the full sort. On SmolLM2's real
# decode logits (temperature 1, top_p 0.9) the nucleus is 9 tokens at the median, 222 at p90
# and 2,833 at the maximum over 320 rows.
STAGES = (64, 1024, 4096)
# A row's top-p cut is proved inside its candidates only when the mass before its last
# candidate exceeds top_p by this much (float32 sums over <= 49k terms are good to ~1e-5).
_TOP_P_MARGIN = 1e-4


@dataclass
class Candidates:
    """What each row may sample: ``values[r, j]`` is the scaled logit of token ``ids[r, j]``,
    ``-inf`` where the token is filtered out. ``ids`` is None when the columns are the whole
    vocabulary in order (``values`` is ``[rows, V]``)."""

    values: torch.Tensor  # float32 [rows, w]
    ids: Optional[torch.Tensor] = None  # int64 [rows, w], or None (w == V, column j is token j)

    def dense(self, vocab: int, fill: float) -> torch.Tensor:
        """``[rows, V]`` with each candidate's value at its token id, ``fill`` elsewhere."""
        if self.ids is None:
            return self.values
        out = torch.full((self.values.shape[0], vocab), fill, dtype=self.values.dtype,
                         device=self.values.device)
        return out.scatter_(-1, self.ids, self.values)


def mask_sorted(sorted_vals: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                whole: Optional[torch.Tensor] = None, whole_probs: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``sorted_vals`` [rows, c] descending: -inf outside each row's top-k and top-p prefix.
    Top-p's mass is the softmax over the row's top-k survivors among these columns, or, where
    ``whole[r]``, ``whole_probs[r]``: these columns' probabilities under the softmax over the
    row's whole vocabulary (top-k off, and the row's tail lies outside these columns)."""
    mask = torch.zeros_like(sorted_vals, dtype=torch.bool)
    if top_k is not None:
        ranks = torch.arange(sorted_vals.shape[-1], device=sorted_vals.device)[None, :]
        mask |= ranks >= top_k[:, None]
    if top_p is not None:
        probs = torch.softmax(sorted_vals.masked_fill(mask, -float("inf")), dim=-1)
        if whole is not None:
            probs = torch.where(whole[:, None], whole_probs, probs)
        before = probs.cumsum(dim=-1) - probs  # mass strictly before this token
        # top_p >= 1 keeps every token: float32 mass reaches 1.0 before the tail ends.
        mask |= (before >= top_p[:, None]) & (top_p < 1.0)[:, None]
    mask[:, 0] = False  # always keep the most likely token
    return sorted_vals.masked_fill(mask, -float("inf"))


def filter_dense(logits: torch.Tensor, top_k: Optional[torch.Tensor],
                 top_p: Optional[torch.Tensor]) -> torch.Tensor:
    """The reference: mask logits outside each row's top-k and top-p sets with -inf, sorting
    every row's whole vocabulary. Any device, no host sync."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    kept = mask_sorted(sorted_logits, top_k, top_p)
    return torch.empty_like(logits).scatter_(-1, order, kept)


def filter_top_k(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                 k_max: int) -> Candidates:
    """Every row to be sampled has ``top_k <= k_max`` (a host int): its kept set lies in its
    ``k_max`` largest, so only those are sorted. Any device, no host sync."""
    cand, ids = logits.topk(k_max, dim=-1)  # sorted, descending
    return Candidates(mask_sorted(cand, top_k, top_p), ids)


def filter_candidates(logits: torch.Tensor, top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor],
                      skip: Optional[torch.Tensor] = None) -> Candidates:
    """Host tensors: the reference's sets (see the module docstring), rows widened only as
    needed. ``skip`` (bool [rows]) marks rows whose filter does not matter (greedy rows): they
    get their first stage's candidates, masked or not. Returns candidate columns when every row
    is filtered, else the dense ``[rows, V]`` logits with the filtered rows masked."""
    rows, vocab = logits.shape
    keep_all = torch.ones(rows, dtype=torch.bool)
    if top_k is not None:
        keep_all &= top_k >= vocab
    if top_p is not None:
        keep_all &= top_p >= 1.0
    if skip is not None:
        keep_all &= ~skip
    pending = torch.arange(rows)[~keep_all]
    # Top-p over the whole vocabulary (top-k off): those rows' softmax, once for all stages.
    whole_rows = probs = None
    if top_p is not None and len(pending):
        whole_rows = (torch.ones(rows, dtype=torch.bool) if top_k is None else top_k >= vocab)[pending]
        if bool(whole_rows.any()):  # softmax, not logsumexp: ~2x faster, inline for one row
            probs = torch.softmax(_rows(logits, pending), dim=-1).view(-1)
    at = torch.arange(len(pending))  # the pending rows' positions in ``probs``
    parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (rows, values, ids)
    for width in STAGES:
        if len(pending) == 0 or width >= vocab:
            break
        k = None if top_k is None else top_k[pending]
        p = None if top_p is None else top_p[pending]
        cand, ids = _rows(logits, pending).topk(width, dim=-1)
        whole = whole_probs = None
        if probs is not None:
            whole = whole_rows[at]
            whole_probs = probs[at[:, None] * vocab + ids]
        kept = mask_sorted(cand, k, p, whole, whole_probs)
        done = _proved(k, p, whole, whole_probs, width)
        if skip is not None:
            done |= skip[pending]
        if not parts or bool(done.all()):  # the first stage keeps every row (fewer copies)
            parts.append((pending, kept, ids))
        else:
            parts.append((pending[done], kept[done], ids[done]))
        pending, at = pending[~done], at[~done]
    if len(pending):
        sorted_vals, order = _rows(logits, pending).sort(dim=-1, descending=True)
        k = None if top_k is None else top_k[pending]
        p = None if top_p is None else top_p[pending]
        parts.append((pending, mask_sorted(sorted_vals, k, p), order))
    return _assemble(logits, keep_all, parts)


def _rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``x[rows]``, without the copy when that is every row (a copy of one 49k row opens an
    OpenMP region, which on a loaded 2-core machine waits for a scheduler slice: ~8 ms)."""
    return x if len(rows) == x.shape[0] else x[rows]


def _proved(top_k: Optional[torch.Tensor], top_p: Optional[torch.Tensor], whole: Optional[torch.Tensor],
            whole_probs: Optional[torch.Tensor], width: int) -> torch.Tensor:
    """bool [rows]: the row's kept set lies within its ``width`` candidates."""
    rows = (top_k if top_k is not None else top_p).shape[0]
    done = torch.zeros(rows, dtype=torch.bool)
    if top_k is not None:
        done |= top_k <= width
    if top_p is not None and whole is not None:
        mass = whole_probs[:, :-1].sum(dim=-1)  # before the last candidate
        done |= whole & (mass >= top_p + _TOP_P_MARGIN)
    return done


def _assemble(logits: torch.Tensor, keep_all: torch.Tensor,
              parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Candidates:
    """One ``Candidates`` from the stages' rows, a later stage's rows overwriting the first's:
    columns as wide as the longest kept prefix (kept sets are sorted prefixes), or dense when
    some row keeps the whole vocabulary."""
    rows, vocab = logits.shape
    if bool(keep_all.any()):
        out = logits.clone()
        for r, vals, ids in parts:
            out[r] = Candidates(vals, ids).dense(vocab, -float("inf"))
        return Candidates(out)
    if not parts:
        return Candidates(logits[:, :0], torch.zeros((rows, 0), dtype=torch.int64))
    width = max(int(torch.isfinite(vals).sum(-1).max()) for _, vals, _ in parts if len(vals))
    first_rows, values, ids = parts[0]  # every row not kept whole, in order: every row here
    if values.shape[1] >= width:
        values, ids = values[:, :width], ids[:, :width]
    else:
        pad = width - values.shape[1]
        values = torch.nn.functional.pad(values, (0, pad), value=-float("inf"))
        ids = torch.nn.functional.pad(ids, (0, pad))
    for r, vals, idx in parts[1:]:
        w = min(width, vals.shape[1])
        values[r, :w] = vals[:, :w]
        ids[r, :w] = idx[:, :w]
    return Candidates(values, ids)
