"""The backend's logits ops (structured output's token bitmask) against the pure-torch
reference. A backend without ``tessellm_logits_ops`` is served by the reference itself."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.logits import ReferenceLogitsOps
from tessellm.backends.spec import LogitsOps, LogitsOpsSpec

REF = ReferenceLogitsOps()


def _ops(target):
    ops = target.registry.provider("tessellm_logits_ops", target.backend, LogitsOpsSpec(torch.float32))[0]
    if ops is None:
        pytest.skip(f"{target.name} provides no logits ops (the reference is used)")
    assert isinstance(ops, LogitsOps)
    return ops


@pytest.mark.parametrize("vocab", [31, 1000])
@pytest.mark.parametrize("with_indices", [False, True])
def test_apply_token_bitmask(target, vocab, with_indices):
    ops = _ops(target)
    g = torch.Generator().manual_seed(vocab)
    words = torch.randint(-2**31, 2**31 - 1, (3, (vocab + 31) // 32), generator=g, dtype=torch.int64)
    bitmask = words.to(torch.int32).to(target.device)
    for dtype in (torch.float32, target.low_precision_dtype):
        logits = torch.randn(4, vocab, generator=g).to(dtype).to(target.device)
        indices = torch.tensor([3, 0, 1], device=target.device) if with_indices else None
        got, want = logits.clone(), logits.cpu().clone()
        ops.apply_token_bitmask(got, bitmask, indices)
        REF.apply_token_bitmask(want, bitmask.cpu(), None if indices is None else indices.cpu())
        assert torch.equal(got.cpu(), want), f"{target.name} {dtype}"


@pytest.mark.parametrize("vocab", [1000, 9000])
def test_argmax(target, vocab):
    """The optional ``argmax``: exactly torch's, ties to the first index, with and without the
    exponential race's divisor."""
    ops = _ops(target)
    if not hasattr(ops, "argmax"):
        pytest.skip(f"{target.name}'s logits ops have no argmax (the sampler uses torch's)")
    g = torch.Generator().manual_seed(vocab)
    for dtype in (torch.float32, target.low_precision_dtype):
        x = torch.randn(3, vocab, generator=g).to(dtype)
        x[0, 5] = x[0, vocab - 2] = 50.0  # a tie across the row
        q = torch.empty(3, vocab).exponential_(generator=g)
        dev_x, dev_q = x.to(target.device), q.to(target.device)
        assert torch.equal(ops.argmax(dev_x).cpu(), x.argmax(dim=-1)), f"{target.name} {dtype}"
        probs = torch.softmax(x.float(), dim=-1)
        got = ops.argmax(probs.to(target.device), dev_q.float()).cpu()
        assert torch.equal(got, (probs / q).argmax(dim=-1)), f"{target.name} {dtype} race"
