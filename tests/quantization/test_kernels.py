"""Every quantized GEMM against dequantize-then-matmul on random data.

Runs the Triton kernels (cuda backend) on a GPU at realistic sizes, or through Triton's
interpreter on the CPU at tiny sizes; the torch ops (cpu backend) run on both. The reference
is ``x @ segment.dequantize().T`` in float32, where ``dequantize`` is the format's definition.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.quant_ops import TorchQuantOps  # noqa: E402
from tessellm.kernels.gemm import fp8, quant_ops  # noqa: E402
from tessellm.kernels.gemm import weight_only as qk  # noqa: E402
from tessellm.quantization.packed import (Fp8Weight, Int4Weight, pack_int4,  # noqa: E402
                                          quantize_fp8, quantize_fp8_per_token, quantize_int4,
                                          quantize_int8)
from tests.gpu_set import GPU_WHEN_PRESENT  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = GPU_WHEN_PRESENT  # every test runs on DEV: in the GPU set where there is one
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# (M, N, K): decode-sized, odd, and (GPU) prefill-sized rows that take the dequantize path.
SHAPES = ([(1, 512, 1024), (7, 384, 4096), (64, 1024, 512), (600, 256, 1024)] if ON_GPU
          else [(1, 48, 128), (5, 40, 256)])
# fp8_weight_only_max_m=0: every fp8 GEMM takes the W8A8 path (test_fp8_w8a8); the default
# ops route small M through W8A16 (test_fp8_weight_only).
OPS = {"torch": TorchQuantOps(), "triton": quant_ops.TritonQuantOps(fp8_weight_only_max_m=0),
       "triton-fp8-fallback": quant_ops.TritonQuantOps(use_scaled_mm=False, fp8_weight_only_max_m=0)}
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1.2e-2}  # relative (Frobenius) error vs the fp32 reference
# On a GPU every shape runs in bf16 and test_other_dtypes covers fp16/fp32 (each dtype and tile
# shape is a separate Triton compile); the interpreter runs every dtype at every (tiny) shape.
DTYPES = [BF16] if ON_GPU else [F32, F16, BF16]


def _gen(*parts):
    return torch.Generator().manual_seed(hash(parts) % (2**31))


def _data(m, n, k, dtype, bias, seed=0):
    g = _gen(m, n, k, seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return w, x, b


def _check(out, x, seg, bias, dtype, tol=None):
    ref = x.float() @ seg.dequantize().to(DEV).t()
    if bias is not None:
        ref = ref + bias.float()
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert torch.isfinite(out).all()
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < (tol or TOL[dtype]), f"relative error {rel:.2e}"


@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("group", [None, 32, 128])
@pytest.mark.parametrize("shape", SHAPES)
def test_int8(ops, dtype, group, shape):
    m, n, k = shape
    w, x, b = _data(m, n, k, dtype, bias=group == 32)
    seg = quantize_int8(w, group).to(DEV)
    _check(OPS[ops].int8_mm(x, seg, b), x, seg, b, dtype)


@pytest.mark.parametrize("ops", ["torch", "triton"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("variant", ["asym-offsets", "zero-point-8", "act-order"])
@pytest.mark.parametrize("shape", SHAPES)
def test_int4(ops, dtype, variant, shape):
    m, n, k = shape
    w, x, b = _data(m, n, k, dtype, bias=variant == "asym-offsets")
    group = 32 if k < 1024 else 128
    if variant == "zero-point-8":  # GGUF Q4_0 / symmetric GPTQ: fp16 scales, no offsets
        q, s, _ = quantize_int4(w, group, symmetric=True)
        seg = Int4Weight(pack_int4(q), s.half(), None, 8, group)
    else:
        q, s, z = quantize_int4(w, group)
        perm = None
        if variant == "act-order":
            perm = torch.randperm(k, generator=_gen(k)).to(torch.int32)
        seg = Int4Weight(pack_int4(q), s, -z * s, 0, group, perm)
    seg = seg.to(DEV)
    _check(OPS[ops].int4_mm(x, seg, b), x, seg, b, dtype)


@pytest.mark.parametrize("ops", ["torch", "triton", "triton-fp8-fallback"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_fp8_w8a8(ops, dtype, shape):
    """The reference quantizes x per token the same way, so only the GEMM is compared."""
    m, n, k = shape
    w, x, b = _data(m, n, k, dtype, bias=True)
    seg = quantize_fp8(w).to(DEV)
    out = OPS[ops].fp8_mm(x, seg, b)
    quantizer = quantize_fp8_per_token if ops == "torch" else fp8.quantize_fp8_rows
    xq, sx = quantizer(x, torch.float8_e4m3fn)
    x_fp8 = xq.float() * sx[:, None]
    # _scaled_mm writes bf16 (row-wise scaling has no fp32 output), whatever x's dtype
    tol = TOL[BF16] if ON_GPU and ops == "triton" else TOL[dtype] if dtype != F32 else 1e-4
    _check(out, x_fp8, seg, b, dtype, tol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + ([(24, 256, 2048)] if ON_GPU else []))
def test_fp8_weight_only(dtype, shape):
    """W8A16: x is not quantized, so the reference is x @ dequant(w).T itself. The default ops
    take this path up to FP8_WEIGHT_ONLY_MAX_M rows, _scaled_mm (or the W8A8 kernel) above."""
    m, n, k = shape
    w, x, b = _data(m, n, k, dtype, bias=True, seed=3)
    seg = quantize_fp8(w).to(DEV)
    _check(qk.fp8_weight_only_gemm(x, seg, b), x, seg, b, dtype)
    if m <= quant_ops.FP8_WEIGHT_ONLY_MAX_M:
        _check(quant_ops.TritonQuantOps().fp8_mm(x, seg, b), x, seg, b, dtype)


@pytest.mark.parametrize("shape", [s for s in SHAPES if s[0] <= 16])
def test_fp8_skinny_w8a8_rows(shape):
    """Ops asked for the skinny W8A8 path: ``gemv.gemv_w8a8`` where the GPU has fp8 MMA (the
    reference quantizes x per row), W8A16 elsewhere (x as it is)."""
    from tessellm.kernels.gemm import w8a8 as gemv

    m, n, k = shape
    w, x, b = _data(m, n, k, BF16, bias=True, seed=5)
    seg = quantize_fp8(w).to(DEV)
    out = quant_ops.TritonQuantOps(fp8_skinny_w8a8_max_m=16).fp8_mm(x, seg, b)
    if gemv.w8a8_native(x, seg.qweight):
        xq, sx = quantize_fp8_per_token(x)
        x = xq.float() * sx[:, None]
    _check(out, x, seg, b, BF16)


@pytest.mark.parametrize("dtype", [BF16, F16])
def test_fp8_weight_only_widens_every_code_exactly(dtype):
    """Every finite e4m3 code (subnormals, +-0, +-448) times a one-hot x comes back unchanged:
    on a GPU this checks the bit-moving conversion (e4m3_to_16bit), code by code."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]  # 254 finite codes
    k = 256
    qweight = torch.zeros(16, k, dtype=torch.float8_e4m3fn)
    qweight[:, :codes.numel()] = codes  # each row holds every code
    seg = Fp8Weight(qweight, torch.ones(16)).to(DEV)
    x = torch.eye(k, dtype=dtype, device=DEV)[:48]  # row m picks weight column m
    out = qk.fp8_weight_only_gemm(x, seg)
    expect = qweight.float()[:, :48].t().to(DEV)
    assert torch.equal(out.float(), expect), (out.float() - expect).abs().max()


@pytest.mark.skipif(ON_GPU, reason="e4m3fnuz is the rocm backend's format (MI300); NVIDIA "
                                   "Triton has no such type, the interpreter does")
def test_fp8_w8a16_e4m3fnuz():
    """The rocm backend's fp8 layers share the W8A16 kernel through ``fp8_w8a16``."""
    m, n, k = SHAPES[1]
    w, x, b = _data(m, n, k, BF16, bias=True, seed=4)
    fmax = torch.finfo(torch.float8_e4m3fnuz).max
    scales = (w.abs().amax(dim=1) / fmax).clamp(min=1e-12)
    qweight = (w / scales[:, None]).clamp(-fmax, fmax).to(torch.float8_e4m3fnuz)
    seg = Fp8Weight(qweight, scales)
    _check(qk.fp8_w8a16(x, qweight, scales, b), x, seg, b, BF16)


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs every dtype in the tests above")
@pytest.mark.parametrize("dtype", [F32, F16])
def test_other_dtypes(dtype):
    shape = SHAPES[1]
    test_int8("triton", dtype, None, shape)
    test_int8("triton", dtype, 128, shape)
    test_int4("triton", dtype, "asym-offsets", shape)
    test_fp8_w8a8("triton", dtype, shape)
    test_fp8_w8a8("triton-fp8-fallback", dtype, shape)
    test_fp8_weight_only(dtype, shape)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_fp8_row_quantizer_matches_torch(dtype):
    x = (torch.randn(9, 300, generator=_gen(9)) * 3).to(DEV, dtype)
    q, s = fp8.quantize_fp8_rows(x, torch.float8_e4m3fn)
    q_ref, s_ref = quantize_fp8_per_token(x)
    assert torch.allclose(s, s_ref, rtol=1e-6)
    diff = q.float() != q_ref.float()
    # the CPU interpreter rounds ties away from zero and halves values that round up to a power
    # of two (its own float -> fp8 conversion); GPUs convert in hardware (round to nearest even)
    assert diff.float().mean() < (0.05 if not ON_GPU else 0.01)
    ratio = q.float()[diff] / q_ref.float()[diff]
    assert ((ratio > 0.45) & (ratio < 1.2)).all()  # one step (ties) or the halving bug


@pytest.mark.gpu
@pytest.mark.skipif(not ON_GPU, reason="the split-K and dequantize paths are GPU-only choices")
def test_gpu_paths_agree():
    """Split-K (small M, long K), single-pass and dequantize+cuBLAS paths give the same y."""
    w, x, _ = _data(600, 2048, 8192, BF16, bias=False)
    seg = quantize_int8(w).to(DEV)
    full = qk.int8_gemm(x, seg)
    deq = quant_ops.TritonQuantOps().int8_mm(x, seg)
    small = qk.int8_gemm(x[:3], seg)
    # bf16 outputs of K=8192 products: compare by relative norm (a wrong split or tile would
    # be off by O(1), rounding differences are ~1e-3).
    for a, b in ((full, deq), (small, full[:3])):
        err = ((a.float() - b.float()).norm() / b.float().norm()).item()
        assert err < 1e-2, f"relative error {err:.2e}"


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_dequantize_kernels(dtype):
    """The large-M path's dequantizers write exactly the format's dense weight (in dtype)."""
    n, k = (256, 1024) if ON_GPU else (40, 256)
    w = torch.randn(n, k, generator=_gen(n, k)) * 0.05
    # float32: exact up to FMA contraction on a GPU (~1 ulp); bf16: one rounding step (the CPU
    # interpreter truncates, GPUs round)
    tol = dict(rtol=2**-22, atol=1e-7) if dtype == F32 else dict(rtol=2**-7, atol=1e-6)
    q, s, z = quantize_int4(w, 128)
    segs = (quantize_int8(w), quantize_int8(w, 32), Int4Weight(pack_int4(q), s, -z * s, 0, 128))
    for seg in segs:
        seg = seg.to(DEV)
        fn = qk.int8_dequantize if seg.kind == "int8" else qk.int4_dequantize
        torch.testing.assert_close(fn(seg, dtype), seg.dequantize(torch.float32).to(dtype), **tol)
