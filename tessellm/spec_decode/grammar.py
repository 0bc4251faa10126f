"""Structured output with drafts: one bitmask row per sampled position of a verifying request.

Row j of a request that verifies drafts d0..dk-1 is the grammar's mask after d0..dj-1, so the
target samples each position under the grammar state it would have without speculation::

    rows:     [ state s ] [ s + d0 ] [ s + d0 d1 ] ... [ s + d0..dk-1 ]   (k + 1 rows)

The matcher advances over the drafts to fill the rows and is rolled back afterwards: it moves
for real only over accepted tokens (``Scheduler.update``). A draft the grammar refuses is
rejected by its own row (the mask gives it no probability), so the rows after it are never
used; they repeat that row (any valid mask would do).
"""

from __future__ import annotations


def fill_draft_rows(grammar, drafts: list[int], bitmask, first_row: int) -> None:
    """Fill ``bitmask[first_row : first_row + len(drafts) + 1]`` for one request."""
    advanced = 0
    for j in range(len(drafts) + 1):
        row = first_row + j
        if advanced < j or grammar.is_terminated:  # draft j-1 refused or ended it: never sampled
            bitmask[row] = bitmask[row - 1]
            continue
        grammar.fill_bitmask(bitmask, row)
        if j < len(drafts) and not grammar.is_terminated and grammar.accept(drafts[j]):
            advanced += 1
    grammar.rollback(advanced)
