"""The runner side of the mask: step mask rows onto the runner's sampling rows (unconstrained
rows untouched; a request verifying k drafts has k+1 consecutive rows, each with its own mask
row), through the reference op and the host-to-device upload."""

from __future__ import annotations

import numpy as np
import torch

from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.structured_output.apply import MaskUpload, apply_grammar_bitmask

V = 40  # two mask words per row


def _row(*allowed: int) -> list[int]:
    words = [0, 0]
    for t in allowed:
        words[t // 32] |= 1 << (t % 32)
    return [w - (1 << 32) if w >= 1 << 31 else w for w in words]  # as int32


def test_rows_map_per_request_and_per_draft():
    logits = torch.zeros(5, V)
    mask = np.array([_row(1, 33), _row(2), _row(3, 39), _row(4)], dtype=np.int32)
    # sampling rows: a, x (unconstrained), c c c (c verifies two drafts)
    apply_grammar_bitmask(logits, ["a", "x", "c", "c", "c"], {"c": 1, "a": 0}, mask, ReferenceLogitsOps(),
                          MaskUpload(torch.device("cpu")))
    finite = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]
    assert finite == [[1, 33], list(range(V)), [2], [3, 39], [4]]


def test_every_row_constrained_in_order_needs_no_index():
    logits = torch.randn(2, V)
    expect = logits.clone()
    expect[0, [t for t in range(V) if t != 5]] = float("-inf")
    expect[1, [t for t in range(V) if t not in (6, 36)]] = float("-inf")
    mask = np.array([_row(5), _row(6, 36)], dtype=np.int32)
    apply_grammar_bitmask(logits, ["a", "b"], {"a": 0, "b": 1}, mask, ReferenceLogitsOps())
    assert torch.equal(logits, expect)
