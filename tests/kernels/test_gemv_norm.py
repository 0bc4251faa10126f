"""The residual-add RMSNorm folded into the one-row GEMV (``kernels/gemm/gemv_norm.py``, an
experiment the engine does not use: ``decode_chain.py --fold`` measures it) against a float64
oracle and against the unfused ops (``fused_add_rms_norm`` then ``gemv``).

The inputs make every part of the fold show: the norm weight g is random (not ones), the row is
scaled so that rstd is far from 1, the residual is random, and N spans several programs (in the
interpreter too), so a wrong rstd, a missing g, a residual sum not rounded like the unfused
add, a residual written in place (later programs would read the sum) or an output element no
program writes each fail. On a GPU the allocator is filled with NaN first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.fused_ops import TritonOps
from tessellm.kernels.gemm.gemv_norm import (
    NORM_GEMV_CONFIG,
    NormGemvConfig,
    gemv_add_rms_norm,
    gemv_add_rms_norm_applies,
)

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16 = torch.bfloat16, torch.float16
# (N, K): K not a multiple of the tile (masked steps) and one that is
SHAPES = [(1031, 4096), (6144, 4096), (77, 1000)] if ON_GPU else [(37, 96), (9, 64)]
CONFIGS = {"default": NORM_GEMV_CONFIG,  # the interpreter: K tiles smaller than K
           "bn4-prefetch": NormGemvConfig(block_n=4, block_k=1024 if ON_GPU else 32,
                                          num_warps=4 if ON_GPU else 1, prefetch=True),
           "bn8": NormGemvConfig(block_n=8, block_k=512 if ON_GPU else 16,
                                 num_warps=4 if ON_GPU else 1)}
if not ON_GPU:
    CONFIGS["default"] = NormGemvConfig(block_n=2, block_k=32, num_warps=1)


def add_rms_norm_linear_reference(x, residual, norm_weight, eps, weight, bias=None):
    """``(y, x + residual)``: the sum rounded to x's dtype, then the norm and the product in
    float64 and ``y`` rounded once."""
    h = x + residual
    hf = h.double()
    xn = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps) * norm_weight.double()
    y = xn @ weight.double().t()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype), h


def _inputs(n, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + n + k)
    x = (torch.randn(1, k, generator=g) * 3).to(DEV, dtype)
    res = (torch.randn(1, k, generator=g) * 5).to(DEV, dtype)
    gw = (torch.rand(k, generator=g) * 2 + 0.1).to(DEV, dtype)
    w = (torch.randn(n, k, generator=g) * 0.05).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    if ON_GPU:
        torch.full(((n + 2 * k) * 4 + (1 << 20),), float("nan"), device=DEV)
    return x, res, gw, w, b


def _close(got, want, dtype):
    assert got.shape == want.shape and got.dtype == dtype
    assert torch.isfinite(got).all(), "an output element was never written"
    err = (got.float() - want.float()).norm() / want.float().norm()
    assert err < (8e-3 if dtype == BF16 else 2e-3), f"relative error {err:.2e}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", SHAPES)
def test_fold_matches_the_float64_oracle(shape, dtype, config):
    n, k = shape
    bias = config != "bn8"
    x, res, gw, w, b = _inputs(n, k, dtype, bias)
    res_before = res.clone()
    y, new_res = gemv_add_rms_norm(x, res, gw, 1e-5, w, b, CONFIGS[config])
    want_y, want_res = add_rms_norm_linear_reference(x.cpu(), res.cpu(), gw.cpu(), 1e-5, w.cpu(),
                                                     None if b is None else b.cpu())
    assert torch.equal(res, res_before), "the residual input must not be modified"
    # the sum rounded once, as the unfused Triton add rounds it (torch's on a GPU; Triton's
    # interpreter truncates float32 -> bf16, in both kernels alike)
    normed, unfused_res = TritonOps().fused_add_rms_norm(x.clone(), res.clone(), gw, 1e-5)
    assert torch.equal(new_res, unfused_res), "the new residual is x + residual, rounded once"
    torch.testing.assert_close(new_res.cpu(), want_res, rtol=2 ** -7, atol=0)
    _close(y.cpu(), want_y, dtype)
    # the oracle is sharper than the unfused ops (which round the normed row): the fold is
    # at least as close to it as they are, give or take a little
    unfused = normed.float() @ w.float().t() + (0 if b is None else b.float())
    err_fold = (y.cpu().double() - want_y.double()).norm()
    err_unfused = (unfused.cpu().to(dtype).double() - want_y.double()).norm()
    assert err_fold <= 1.5 * err_unfused + 1e-6, (err_fold, err_unfused)


def test_fold_is_deterministic_and_every_part_counts():
    n, k = SHAPES[0]
    x, res, gw, w, b = _inputs(n, k, BF16, True, seed=1)
    y1, r1 = gemv_add_rms_norm(x, res, gw, 1e-5, w, b, CONFIGS["default"])
    y2, r2 = gemv_add_rms_norm(x, res, gw, 1e-5, w, b, CONFIGS["default"])
    assert torch.equal(y1, y2) and torch.equal(r1, r2)
    want, _ = add_rms_norm_linear_reference(x.cpu(), res.cpu(), gw.cpu(), 1e-5, w.cpu(), b.cpu())
    # what a fold without g, without rstd or with the un-summed x would give is far from it
    ones = torch.ones_like(gw)
    wrong_g, _ = add_rms_norm_linear_reference(x.cpu(), res.cpu(), ones.cpu(), 1e-5, w.cpu(),
                                               b.cpu())
    no_rstd = ((x + res).float() * gw.float()) @ w.float().t() + b.float()
    wrong_sum, _ = add_rms_norm_linear_reference(x.cpu(), 0 * res.cpu(), gw.cpu(), 1e-5, w.cpu(),
                                                 b.cpu())
    for wrong in (wrong_g, no_rstd.cpu(), wrong_sum):
        assert (wrong.float() - want.float()).norm() / want.float().norm() > 0.05
    _close(y1.cpu(), want, BF16)


def test_refuses_what_it_cannot_run():
    x, res, gw, w, _ = _inputs(8, 64, BF16, False)
    two = torch.cat([x, x])
    assert not gemv_add_rms_norm_applies(two, torch.cat([res, res]), gw, w)
    assert not gemv_add_rms_norm_applies(x.float(), res.float(), gw.float(), w.float())
    assert not gemv_add_rms_norm_applies(x, res, gw, w.half())
    with pytest.raises(ValueError, match="one 16-bit row"):
        gemv_add_rms_norm(two, torch.cat([res, res]), gw, 1e-5, w)

