"""The token-bitmask Triton kernel against the pure-torch reference (and xgrammar's layout)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.logits import ReferenceLogitsOps, unpack_bitmask
from tessellm.kernels.bitmask import apply_token_bitmask

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REF = ReferenceLogitsOps()


def _random_mask(rows: int, vocab: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    words = torch.randint(-2**31, 2**31 - 1, (rows, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    return words.to(torch.int32)


@pytest.mark.parametrize("vocab", [1, 33, 1000, 2085])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_indices", [False, True])
def test_kernel_matches_reference(vocab, dtype, with_indices):
    g = torch.Generator().manual_seed(vocab)
    logits = torch.randn(5, vocab, generator=g).to(dtype).to(DEVICE)
    bitmask = _random_mask(3, vocab, vocab).to(DEVICE)
    indices = torch.tensor([4, 0, 2], device=DEVICE) if with_indices else None
    got, want = logits.clone(), logits.clone()
    apply_token_bitmask(got, bitmask, indices)
    REF.apply_token_bitmask(want, bitmask, indices)
    assert torch.equal(got, want)  # allowed logits untouched, bit-exact; others -inf
    rows = indices.tolist() if with_indices else [0, 1, 2]
    allowed = unpack_bitmask(bitmask.cpu(), vocab)
    for i, r in enumerate(rows):
        assert torch.equal(torch.isneginf(got[r].cpu()), ~allowed[i])
    untouched = sorted(set(range(5)) - set(rows))
    assert torch.equal(got[untouched], logits[untouched])


def test_reference_matches_xgrammar_layout():
    xgr = pytest.importorskip("xgrammar")
    logits = torch.randn(2, 100)
    bitmask = _random_mask(2, 100, 7)
    a, b = logits.clone(), logits.clone()
    xgr.apply_token_bitmask_inplace(a, bitmask)
    REF.apply_token_bitmask(b, bitmask)
    assert torch.equal(a, b)


def test_too_narrow_mask_is_refused():
    with pytest.raises(ValueError, match="words per row"):
        apply_token_bitmask(torch.zeros(1, 100, device=DEVICE), torch.zeros(1, 3, dtype=torch.int32, device=DEVICE))
