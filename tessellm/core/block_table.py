"""Host-side block tables that persist across steps: one row per running request.

A decode step needs every running request's block table. Rebuilding it from Python lists each
step costs ~1 ms at batch 256; here each request keeps a row, written once per added block, and
a step gathers its rows with one numpy fancy index::

    row 0: [ 7  2  9  0 ...]   request A, 3 blocks
    row 1: [ 4  0  0  0 ...]   request B, 1 block
    step order (B, A) -> table[[1, 0], :width]
"""

from __future__ import annotations

import numpy as np


class PersistentBlockTable:
    def __init__(self, width: int, rows: int = 256):
        self.width = width
        self.table = np.zeros((rows, width), dtype=np.int32)
        self.num_blocks = np.zeros(rows, dtype=np.int64)
        self.free_rows = list(range(rows - 1, -1, -1))

    def add(self, block_ids: list[int]) -> int:
        """A row for a new request; returns its index."""
        if not self.free_rows:
            self._grow()
        row = self.free_rows.pop()
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        if block_ids:
            n = int(self.num_blocks[row])
            self.table[row, n:n + len(block_ids)] = block_ids
            self.num_blocks[row] = n + len(block_ids)

    def remove(self, row: int) -> None:
        self.free_rows.append(row)

    def _grow(self) -> None:
        old = self.table.shape[0]
        self.table = np.concatenate([self.table, np.zeros_like(self.table)])
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros_like(self.num_blocks)])
        self.free_rows.extend(range(2 * old - 1, old - 1, -1))
