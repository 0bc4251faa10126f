"""gpt-oss's experts in the Triton grouped MoE (``kernels/moe/fused_moe.py``): the clamped
SwiGLU and per-expert biases in the first GEMM's epilogue (fused path) or after it (unfused
path, the activation in torch), the down bias before the routing weight; against the reference
loop (``reference/moe.py``). Token counts that would take the decode path run the grouped GEMMs
(the decode kernels have no variant). GPU, or Triton's interpreter on the CPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.moe import ExpertActivation, fused_moe_reference, route  # noqa: E402
from tessellm.kernels.moe import fused_moe, fused_moe_triton  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
ACT = ExpertActivation("swiglu_oai", alpha=1.702, limit=3.0)
E, H, I = 6, 64, 32


def _case(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(E, 2 * I, H, generator=g) * (6.0 / H ** 0.5)  # past the clamp at 3
    w2 = torch.randn(E, H, I, generator=g) / I ** 0.5
    b13, b2 = torch.randn(E, 2 * I, generator=g), torch.randn(E, H, generator=g)
    x, logits = torch.randn(tokens, H, generator=g), torch.randn(tokens, E, generator=g)
    return x, logits, w13, w2, b13, b2


def _on(*ts):
    return [t.to(DEVICE) for t in ts]


@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_fused_epilogue_matches_reference(tokens):
    x, logits, w13, w2, b13, b2 = _case(tokens, tokens)
    want = fused_moe_reference(x, logits, w13, w2, 2, "softmax", True, activation=ACT,
                               w13_bias=b13, w2_bias=b2)
    got = fused_moe(*_on(x, logits, w13, w2), 2, "softmax", True, activation=ACT,
                    w13_bias=b13.to(DEVICE), w2_bias=b2.to(DEVICE))
    torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
    plain = fused_moe_reference(x, logits, w13, w2, 2, "softmax", True, w13_bias=b13,
                                w2_bias=b2)  # SiLU: the activation matters here
    assert (plain - want).abs().max() > 1e-2


@pytest.mark.parametrize("fuse", [True, False])
def test_each_path_with_each_part(fuse):
    """Fused and unfused epilogues; the biases and the clamp each change the result (a kernel
    that drops one fails)."""
    x, logits, w13, w2, b13, b2 = _case(20, 7)
    weights, ids = route(logits, 2, "softmax", True)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SILU_MUL=fuse)
    for b13_, b2_, act in ((b13, b2, ACT), (None, b2, ACT), (b13, None, ACT), (b13, b2, None)):
        want = fused_moe_reference(x, logits, w13, w2, 2, "softmax", True,
                                   **({} if act is None else {"activation": act}),
                                   w13_bias=b13_, w2_bias=b2_)
        got = fused_moe_triton(*_on(x, weights, ids.int(), w13, w2), tiles=tiles, activation=act,
                               w13_bias=None if b13_ is None else b13_.to(DEVICE),
                               w2_bias=None if b2_ is None else b2_.to(DEVICE))
        torch.testing.assert_close(got.cpu(), want, atol=2e-4, rtol=2e-4)
