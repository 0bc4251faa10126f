"""The runner side of the mask: step mask rows onto the runner's sampling rows (unconstrained
rows untouched; a request verifying k drafts has k+1 consecutive rows, each with its own mask
row), through the reference op and the host-to-device upload."""

from __future__ import annotations

import numpy as np
import pytest
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


def test_rows_out_of_order_go_up_whole_with_an_index():
    """Mask rows in another order than the sampling rows: the mask is applied as filled (no
    gather on the host), row i onto the logits row of its request."""
    logits = torch.zeros(3, V)
    mask = np.array([_row(7), _row(8, 38)], dtype=np.int32)
    apply_grammar_bitmask(logits, ["x", "b", "a"], {"a": 0, "b": 1}, mask, ReferenceLogitsOps())
    finite = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits]
    assert finite == [list(range(V)), [8, 38], [7]]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers need a GPU")
def test_mask_filled_in_a_lent_pinned_buffer_is_uploaded_as_is():
    """The engine core fills the mask straight into the runner's pinned buffers (in turn);
    each upload sees exactly what was filled for its step, also when a buffer comes round
    again while the device still works."""
    from tessellm.kernels.bitmask import apply_token_bitmask

    class Ops:
        def apply_token_bitmask(self, logits, mask, indices=None):
            apply_token_bitmask(logits, mask, indices)

    upload = MaskUpload(torch.device("cuda"))
    vocab = 4000
    width = (vocab + 31) // 32
    busy = torch.randn(4096, 4096, device="cuda")
    results = []
    for step in range(6):
        busy = busy @ busy / 64  # keeps the device behind the host: buffers come round early
        host = upload.host_buffer(2, width)
        assert upload._lent(host) is not None
        host.zero_()
        host[0, step] = 1  # token 32 * step allowed
        host[1, step + 1] = 2  # token 32 * (step + 1) + 1
        logits = torch.zeros(2, vocab, device="cuda")
        apply_grammar_bitmask(logits, ["a", "b"], {"a": 0, "b": 1}, host.numpy(), Ops(), upload)
        results.append(logits)
    for step, logits in enumerate(results):
        finite = [torch.nonzero(torch.isfinite(row)).flatten().tolist() for row in logits.cpu()]
        assert finite == [[32 * step], [32 * (step + 1) + 1]]
