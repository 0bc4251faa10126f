"""SiLU-and-mul in the one-row GEMVs' epilogue (``gemv.gemv_silu_and_mul``,
``gemv_x2.gemv_fp8_x2_silu_and_mul``) against the two launches they replace (the GEMV, then
``TritonOps.silu_and_mul``): bitwise equal, on the GPU and in the interpreter alike (the
interpreter truncates float32 -> bf16 casts, so kernel is compared with kernel), and close to
a float64 oracle.

The output width I is odd and spans several programs (the last one half masked), the weight's
up half differs from its gate half, and on a GPU the allocator is filled with NaN first, so a
swapped half, a wrong pairing of rows j and j + I, a wrong scale or bias row, or an output no
program writes each fail.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.ops import linear_silu_and_mul  # noqa: E402
from tessellm.backends.reference.quant_ops import fp8_mm_silu_and_mul  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_x2  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16 = torch.bfloat16, torch.float16
OPS = TritonOps()
SHAPES = [(1031, 4096), (7, 300)] if ON_GPU else [(7, 96), (5, 64)]  # (I, K)
CONFIGS = {"default": None,  # gemv_config's M <= 2 tiles for [2I, K]
           "bn4": gv.GemvConfig(block_n=4, block_k=32, num_warps=1, stages=1),
           "bn8-chunk": gv.GemvConfig(block_n=8, block_k=64, num_warps=2, stages=1, chunk=8)}
X2_CONFIGS = {"default": None, "bn4": (4, 8, 1), "bn8": (8, 16, 2)}  # (block_n, words, warps)


def _data(m, i, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed + 31 * i + k)
    x = (torch.randn(m, k, generator=g) * 2).to(DEV, dtype)
    w = torch.cat([torch.randn(i, k, generator=g) * 0.1, torch.randn(i, k, generator=g) * 0.3])
    b = torch.randn(2 * i, generator=g).to(DEV, dtype) if bias else None
    if ON_GPU:
        torch.full(((4 * i + m) * k * 2 + (1 << 20),), float("nan"), device=DEV)
    return x, w.to(DEV), b


def _oracle(x, w, b):
    """float64 silu(gate) * up of the exact product."""
    y = x.double() @ w.double().t()
    if b is not None:
        y = y + b.double()
    gate, up = y.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up


def _close(got, want, rel):
    assert torch.isfinite(got).all(), "an output element was never written"
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < rel, f"relative error {err:.2e}"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_silu_and_mul_is_bitwise_the_two_launches(shape, dtype, config):
    i, k = shape
    for m, bias in ((1, True), (2, False)):
        x, w, b = _data(m, i, k, dtype, bias, m)
        w = w.to(dtype)
        cfg = CONFIGS[config]
        fused = gv.gemv_silu_and_mul(x, w, b, config=cfg)
        two = OPS.silu_and_mul(gv.gemv(x, w, b, config=cfg))
        assert fused.shape == (m, i) and fused.dtype == dtype
        assert torch.equal(fused, two), f"M={m}: not bitwise the GEMV then silu_and_mul"
        _close(fused, _oracle(x, w, b), 2e-2 if dtype == BF16 else 4e-3)


@pytest.mark.parametrize("config", list(X2_CONFIGS))
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_fp8_x2_silu_and_mul_is_bitwise_the_two_launches(shape, config):
    i, k = shape
    for bias in (True, False):
        x, w, b = _data(1, i, k, BF16, bias, 7)
        seg = quantize_fp8(w, torch.float8_e4m3fn)
        cfg = X2_CONFIGS[config]
        fused = gemv_x2.gemv_fp8_x2_silu_and_mul(x, seg.qweight, seg.scales, b, config=cfg)
        two = OPS.silu_and_mul(gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=cfg,
                                                   split_k=1))
        assert fused.shape == (1, i) and fused.dtype == BF16
        assert torch.equal(fused, two), "not bitwise gemv_fp8_x2 then silu_and_mul"
        wd = seg.qweight.float() * seg.scales[:, None]  # the oracle of the codes themselves
        _close(fused, _oracle(x, wd, b), 2e-2)
        _close(fused, fp8_mm_silu_and_mul(x, seg, b).double(), 2e-2)


def test_refuses_what_it_cannot_run():
    x, w, _ = _data(3, 4, 64, BF16, False, 0)
    with pytest.raises(ValueError, match="at most 2 rows"):
        gv.gemv_silu_and_mul(x, w.to(BF16))
    with pytest.raises(ValueError, match="even row count"):
        gv.gemv_silu_and_mul(x[:1], w[:7].to(BF16))
    with pytest.raises(TypeError, match="cast one of them"):
        gv.gemv_silu_and_mul(x[:1], w.to(F16))
    seg = quantize_fp8(w[:7], torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="even row count"):
        gemv_x2.gemv_fp8_x2_silu_and_mul(x[:1], seg.qweight, seg.scales)


@pytest.mark.parametrize("rows", [1, 2, 5])
def test_triton_ops_linear_silu_and_mul(rows):
    """The backend op: the fused GEMV at decode rows, GEMV-or-torch then the activation above;
    both against the reference op. fp32 takes torch's product (as ``linear`` does)."""
    for dtype in (BF16, torch.float32):
        x, w, b = _data(rows, 5, 64, dtype, True, rows)
        w = w.to(dtype)
        got = OPS.linear_silu_and_mul(x, w, b)
        assert torch.equal(got, OPS.silu_and_mul(OPS.linear(x, w, b)))
        torch.testing.assert_close(got.float(), linear_silu_and_mul(x, w, b).float(),
                                   rtol=2e-2, atol=2e-2)


def test_fp8_method_folds_at_one_row(monkeypatch):
    """The fp8 linear method on the cuda backend's ``TritonQuantOps``: at one row
    ``apply_silu_and_mul`` takes the fused x2 GEMV where ``apply`` takes ``gemv_fp8_x2`` (sm90+;
    the device check is lifted here so that the interpreter runs both) and gives the bits of
    ``apply`` then ``silu_and_mul``; at two rows it runs those two."""
    from tessellm.kernels.gemm import quant_ops, weight_only
    from tessellm.quantization.int8_fp8 import Fp8Method

    def x2_applies(x, qweight):
        return x.shape[0] == 1 and x.dtype == BF16 and qweight.dtype == torch.float8_e4m3fn

    monkeypatch.setattr(quant_ops, "_use_gemv_x2", x2_applies)
    monkeypatch.setattr(weight_only, "_use_gemv_x2", x2_applies)
    calls = []
    fused_x2 = quant_ops.gemv_fp8_x2_silu_and_mul
    monkeypatch.setattr(quant_ops, "gemv_fp8_x2_silu_and_mul",
                        lambda *a: calls.append(a[0].shape[0]) or fused_x2(*a))
    method = Fp8Method(quant_ops.TritonQuantOps())
    layer = torch.nn.Module()
    layer.input_size, layer.output_size, layer.output_sizes = 64, 14, [7, 7]
    with torch.device(DEV):
        method.create_weights(layer, 64, 14, BF16)
    _, w, b = _data(1, 7, 64, BF16, True, 3)
    method.quantize_dense(layer, w.to(BF16))
    method.process_weights_after_loading(layer)
    for rows in (1, 2):
        x = _data(rows, 7, 64, BF16, False, rows)[0]
        fused = method.apply_silu_and_mul(layer, x, b)
        assert torch.equal(fused, OPS.silu_and_mul(method.apply(layer, x, b)))
    assert calls == [1], "one row takes the fused x2 GEMV, two rows do not"
