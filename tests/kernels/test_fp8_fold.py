"""The fp8 activation fold: RMSNorm, residual-add RMSNorm and SiLU-and-mul that quantize their
output per token in the same kernel (``kernels/norm.py``, ``kernels/activation.py``).

The folded kernels must be bitwise the unfused pair (the op, then ``quantize_fp8_rows``), so
greedy tokens cannot change; they are also checked against the pure-torch references
(``backends/reference/ops.py``), and the W8A8 product of a pre-quantized activation against
``fp8_mm`` of the unquantized one. On a GPU at model sizes, else in Triton's interpreter.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference import ops as ref  # noqa: E402
from tessellm.backends.reference.quant_ops import TorchQuantOps  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm.common import _tiles  # noqa: E402
from tessellm.kernels.gemm.fp8 import fp8_gemm, quantize_fp8_rows  # noqa: E402
from tessellm.kernels.gemm.quant_ops import TritonQuantOps  # noqa: E402
from tessellm.quantization.packed import Fp8Activation, quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
FP8 = torch.float8_e4m3fn
DTYPES = [torch.bfloat16, torch.float16, torch.float32]
HIDDEN = [4096, 5120] if ON_GPU else [96, 200]  # 200: not a power of two
# 64: one block in the interpreter (150: two passes); on a GPU 20000 takes two passes
INTER = [14336, 1000, 20000] if ON_GPU else [150, 64]
ROWS = [1, 37, 256] if ON_GPU else [1, 5]
OPS = TritonOps()


def _randn(*shape, dtype, seed, scale=1.0):
    g = torch.Generator().manual_seed(zlib.crc32(repr((shape, seed)).encode()))
    return (scale * torch.randn(*shape, generator=g)).to(dtype).to(DEV)


def _same(xa: Fp8Activation, q: torch.Tensor, s: torch.Tensor, dtype: torch.dtype):
    assert xa.qx.dtype == FP8 and xa.scales.shape == (q.shape[0], 1) and xa.dtype == dtype
    assert torch.equal(xa.qx.view(torch.uint8), q.view(torch.uint8)), "codes differ"
    assert torch.equal(xa.scales, s), "scales differ"


def _near(xa: Fp8Activation, want: Fp8Activation, y: torch.Tensor):
    """Against the reference (``y``: the unquantized reference op's output): scales within a
    few roundings of the model dtype (the reference norm's rsqrt is not the kernel's 1 / sqrt),
    and the dequantized rows within fp8's error of y (e4m3: 1/16 relative; the interpreter's
    own float -> fp8 conversion also halves a few values, as ``tests/quantization/
    test_kernels.py`` notes)."""
    rtol = 1e-5 if xa.dtype == torch.float32 else 3e-2  # 2-4 ulps of a 16-bit max |x|
    torch.testing.assert_close(xa.scales, want.scales, rtol=rtol, atol=0)
    yf = y.float()
    rel = ((xa.qx.float() * xa.scales - yf).norm() / yf.norm()).item()
    assert rel < (0.05 if ON_GPU else 0.15), f"relative error {rel:.3f}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm_fp8_is_the_norm_then_the_quantizer(dtype, hidden):
    for rows in ROWS:
        x = _randn(rows, hidden, dtype=dtype, seed=1, scale=3.0)
        w = _randn(hidden, dtype=dtype, seed=2)
        xa = OPS.rms_norm_fp8(x, w, 1e-6, FP8)
        _same(xa, *quantize_fp8_rows(OPS.rms_norm(x, w, 1e-6), FP8, keepdim=True), dtype)
        _near(xa, ref.rms_norm_fp8(x, w, 1e-6, FP8), ref.ReferenceOps().rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_add_rms_norm_fp8_is_the_norm_then_the_quantizer(dtype, hidden):
    for rows in ROWS:
        x = _randn(rows, hidden, dtype=dtype, seed=3)
        r = _randn(rows, hidden, dtype=dtype, seed=4, scale=2.0)
        w = _randn(hidden, dtype=dtype, seed=5)
        out, res = OPS.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-5)
        r_in = r.clone()
        xa, res_f = OPS.fused_add_rms_norm_fp8(x.clone(), r_in, w, 1e-5, FP8)
        assert torch.equal(res_f, res) and res_f.data_ptr() == r_in.data_ptr()  # in place
        _same(xa, *quantize_fp8_rows(out, FP8, keepdim=True), dtype)
        want, want_res = ref.fused_add_rms_norm_fp8(x, r, w, 1e-5, FP8)
        torch.testing.assert_close(res_f, want_res)
        _near(xa, want, ref.ReferenceOps().rms_norm(want_res, w, 1e-5))


def test_fused_add_rms_norm_fp8_promotes_the_residual():
    """A float32 residual with a bf16 x: the sum comes back as a new float32 tensor, and the
    norm is rounded to float32 (the unfused op's output dtype) before quantization."""
    x = _randn(3, 64, dtype=torch.bfloat16, seed=6)
    r = _randn(3, 64, dtype=torch.float32, seed=7)
    w = _randn(64, dtype=torch.bfloat16, seed=8)
    out, res = OPS.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-6)
    xa, res_f = OPS.fused_add_rms_norm_fp8(x.clone(), r.clone(), w, 1e-6, FP8)
    assert res_f.dtype == torch.float32 and torch.equal(res_f, res)
    _same(xa, *quantize_fp8_rows(out, FP8, keepdim=True), out.dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("d", INTER)
def test_silu_and_mul_fp8_is_the_activation_then_the_quantizer(dtype, d):
    for rows in ROWS:
        x = _randn(rows, 2 * d, dtype=dtype, seed=9, scale=4.0)
        xa = OPS.silu_and_mul_fp8(x, FP8)
        _same(xa, *quantize_fp8_rows(OPS.silu_and_mul(x), FP8, keepdim=True), dtype)
        _near(xa, ref.silu_and_mul_fp8(x, FP8), ref.ReferenceOps().silu_and_mul(x))


def test_zero_rows_and_bad_dtype():
    x = torch.empty(0, 64, dtype=torch.bfloat16, device=DEV)
    w = torch.ones(64, dtype=torch.bfloat16, device=DEV)
    assert OPS.rms_norm_fp8(x, w, 1e-6, FP8).qx.shape == (0, 64)
    assert OPS.silu_and_mul_fp8(x, FP8).scales.shape == (0, 1)
    with pytest.raises(ValueError, match="float8_e4m3fn"):
        OPS.rms_norm_fp8(torch.ones(1, 64, device=DEV), w, 1e-6, torch.bfloat16)


@pytest.mark.parametrize("ops", [TritonQuantOps(fp8_weight_only_max_m=0),
                                 TritonQuantOps(use_scaled_mm=False, fp8_weight_only_max_m=0),
                                 TorchQuantOps()], ids=["triton", "triton-gemm", "torch"])
def test_prequantized_product_is_fp8_mm(ops):
    """``fp8_mm_prequantized`` of the activation ``fp8_mm`` would quantize itself gives the
    same bits (with the bias, in x's dtype)."""
    n, k = (512, 1024) if ON_GPU else (48, 64)
    x = _randn(40, k, dtype=torch.bfloat16, seed=10)
    b = _randn(n, dtype=torch.bfloat16, seed=11)
    seg = quantize_fp8(_randn(n, k, dtype=torch.float32, seed=12) * 0.05).to(DEV)
    if isinstance(ops, TorchQuantOps):
        xa = Fp8Activation.quantize(x, FP8)
    else:
        xa = Fp8Activation(*quantize_fp8_rows(x, FP8, keepdim=True), x.dtype)
    got = ops.fp8_mm_prequantized(xa, seg, b)
    assert got.dtype == x.dtype and torch.equal(got, ops.fp8_mm(x, seg, b))


@pytest.mark.skipif(not ON_GPU, reason="split-K is a GPU launch choice (the interpreter takes "
                    "one K range)")
def test_triton_fp8_gemm_gives_the_same_bits_every_call():
    """The Triton fp8 GEMM with split-K: each K range's partial product summed in split order,
    so repeated calls agree bit for bit (issue 22: fp32 atomics added the partials in whatever
    order the programs finished, and ``[triton-gemm]`` above failed on an H100), and the sum is
    the product (each partial counted once, the bias once)."""
    n, k = 512, 1024
    x = _randn(40, k, dtype=torch.bfloat16, seed=13)
    b = _randn(n, dtype=torch.bfloat16, seed=14)
    w = quantize_fp8(_randn(n, k, dtype=torch.float32, seed=15) * 0.05).to(DEV)
    xq, sx = quantize_fp8_rows(x, FP8)
    assert _tiles(xq, 40, n, k, k)["SPLIT_K"] > 1  # the shape splits K (132 SMs: 8 ranges)
    first = fp8_gemm(xq, sx, w, torch.bfloat16, b)
    for _ in range(20):
        assert torch.equal(fp8_gemm(xq, sx, w, torch.bfloat16, b), first)
    want = (xq.float() @ w.qweight.float().T) * sx[:, None] * w.scales[None, :] + b.float()
    torch.testing.assert_close(first.float(), want, rtol=1e-2, atol=1e-2)


def test_w8a8_rows():
    """The fold applies where ``fp8_mm`` quantizes x itself: above the W8A16 rows."""
    ops = TritonQuantOps()
    m = ops.fp8_weight_only_max_m
    assert not ops.fp8_w8a8_rows(1) and not ops.fp8_w8a8_rows(m) and ops.fp8_w8a8_rows(m + 1)
    assert not TritonQuantOps(fp8_skinny_w8a8_max_m=64).fp8_w8a8_rows(m + 1)
    assert TritonQuantOps(fp8_weight_only_max_m=0).fp8_w8a8_rows(1)
    assert TorchQuantOps().fp8_w8a8_rows(1)
