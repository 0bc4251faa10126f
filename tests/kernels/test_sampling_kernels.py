"""tessellm/kernels/sampling.py against torch.argmax: first index on ties, rows that end inside a
chunk, bfloat16 input, and the exponential race's fused divide (run under TRITON_INTERPRET=1 on
the cpu, on the device where there is one)."""

from __future__ import annotations

import pytest
import torch

sampling = pytest.importorskip("tessellm.kernels.sampling")


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("rows,vocab", [(1, 5000), (3, 4096), (2, 8193), (4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_equals_torch(rows, vocab, dtype):
    g = torch.Generator().manual_seed(rows * vocab)
    x = torch.randn(rows, vocab, generator=g).to(dtype)
    # Ties: the row maximum twice, in different chunks, and twice inside one chunk.
    x[0, 10] = x[0, vocab - 1] = 9.0
    if rows > 1:
        x[1, 7] = x[1, 8] = 9.0
    x = x.to(_device())
    assert torch.equal(sampling.argmax(x).cpu(), x.float().argmax(dim=-1).cpu())
    assert sampling.argmax(x).dtype == torch.int64


def test_argmax_of_exponential_race_equals_torch():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 9000, generator=g), dim=-1)
    q = torch.empty_like(probs).exponential_(generator=g)
    probs, q = probs.to(_device()), q.to(_device())
    assert torch.equal(sampling.argmax(probs, q).cpu(), (probs / q).argmax(dim=-1).cpu())


def test_argmax_refuses_what_it_cannot_read():
    with pytest.raises(ValueError, match="contiguous rows"):
        sampling.argmax(torch.zeros(4, 8).t())
    with pytest.raises(ValueError, match="divisor"):
        sampling.argmax(torch.zeros(2, 8), torch.ones(2, 4))
