"""The residual-add RMSNorm in the one-row GEMVs' last program (``gemm/norm_epilogue.py``:
``gemv.gemv_then_add_rms_norm``, ``gemv_x2.gemv_fp8_x2_then_add_rms_norm``) against the two
launches they replace (the GEMV, then ``TritonOps.fused_add_rms_norm``): the normed row and the
new residual bitwise equal, on the GPU and in the interpreter alike (kernel against kernel), and
close to the pure-torch oracles (``reference.ops.linear_add_rms_norm``,
``reference.quant_ops.fp8_mm_add_rms_norm``).

N spans several programs and is not a power of two (the norm's masked tail), each case runs
twice (the counter must come back to zero: a second launch that never finds its last program
leaves the norm unwritten), and on a GPU the outputs are NaN-filled first, so a norm no program
runs, a wrong residual or a wrong scale fails.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.ops import linear_add_rms_norm  # noqa: E402
from tessellm.backends.reference.quant_ops import fp8_mm_add_rms_norm  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_x2  # noqa: E402
from tessellm.kernels.gemm import norm_epilogue as ne  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16 = torch.bfloat16, torch.float16
OPS = TritonOps()
SHAPES = [(4096, 4096), (4096, 14336), (1030, 512)] if ON_GPU else [(50, 64), (12, 96)]  # N, K
CONFIGS = {"default": None,
           "bn4": gv.GemvConfig(block_n=4, block_k=32, num_warps=1, stages=1)}
X2_CONFIGS = {"default": None, "bn4": (4, 8, 1)}  # (block_n, words, warps)


def _data(n, k, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed + 7 * n + k)
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    w = torch.randn(n, k, generator=g) * k ** -0.5
    res = (torch.randn(1, n, generator=g) * 2).to(DEV, dtype)
    g_w = (1 + 0.5 * torch.randn(n, generator=g)).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return x, w.to(DEV), res, g_w, b


def _check(fused, unfused, res_before, oracle, dtype):
    """``fused``/``unfused``: (normed, residual) of the one-launch and two-launch paths."""
    (out, res), (want_out, want_res) = fused, unfused
    assert torch.isfinite(out).all(), "a normed element was never written"
    assert out.shape == want_out.shape and out.dtype == want_out.dtype
    assert torch.equal(res, want_res), "new residual differs from the two launches"
    assert torch.equal(out, want_out), "normed row differs from the two launches"
    ref_out, ref_res = oracle
    tol = 2e-2 if dtype == BF16 else 4e-3
    torch.testing.assert_close(res.float().cpu(), ref_res.float(), atol=tol * 4, rtol=tol)
    torch.testing.assert_close(out.float().cpu(), ref_out.float(), atol=tol * 4, rtol=tol)


def _nan_like(t):
    return torch.full_like(t, float("nan"))


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("cfg", list(CONFIGS))
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_then_add_rms_norm_bitwise(n, k, dtype, cfg, bias):
    x, w, res, g_w, b = _data(n, k, dtype, bias, 1)
    w = w.to(dtype)
    config = CONFIGS[cfg]
    oracle = linear_add_rms_norm(x.cpu().float(), w.cpu().float(), res.cpu().float(),
                                 g_w.cpu().float(), 1e-5, None if b is None else b.cpu().float())
    for _ in range(2):  # the counter comes back to zero
        r1, r2 = res.clone(), res.clone()
        unfused = OPS.fused_add_rms_norm(gv.gemv(x, w, b, config=config), r2, g_w, 1e-5)
        fused = gv.gemv_then_add_rms_norm(x, w, r1, g_w, 1e-5, b, config=config)
        assert fused[1].data_ptr() == r1.data_ptr(), "the residual is updated in place"
        _check(fused, unfused, res, oracle, dtype)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("cfg", list(X2_CONFIGS))
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_fp8_x2_then_add_rms_norm_bitwise(n, k, cfg, bias):
    x, w, res, g_w, b = _data(n, k, BF16, bias, 2)
    q = quantize_fp8(w)
    config = X2_CONFIGS[cfg]
    oracle = fp8_mm_add_rms_norm(x.cpu(), quantize_fp8(w.cpu()), res.cpu(), g_w.cpu(), 1e-5,
                                 None if b is None else b.cpu())
    for _ in range(2):
        r1, r2 = res.clone(), res.clone()
        y = gemv_x2.gemv_fp8_x2(x, q.qweight, q.scales, b, config=config, split_k=1)
        unfused = OPS.fused_add_rms_norm(y, r2, g_w, 1e-5)
        fused = gemv_x2.gemv_fp8_x2_then_add_rms_norm(x, q.qweight, q.scales, r1, g_w, 1e-5, b,
                                                      config=config)
        _check(fused, unfused, res, oracle, BF16)


def test_counter_left_zero_and_per_weight():
    x, w, res, g_w, _ = _data(12, 96, BF16, False, 3)
    w = w.to(BF16)
    gv.gemv_then_add_rms_norm(x, w, res.clone(), g_w, 1e-5)
    ctr = ne._counter(x.device, w.data_ptr())
    assert ctr.item() == 0, "the last program resets the counter for the next launch"
    w2 = w.clone()
    assert ne._counter(x.device, w2.data_ptr()) is not ctr


def test_applies_and_errors():
    x, w, res, g_w, _ = _data(12, 96, BF16, False, 4)
    w = w.to(BF16)
    assert ne.norm_epilogue_applies(x, 12, res, g_w)
    assert not ne.norm_epilogue_applies(torch.cat([x, x]), 12, res, g_w)  # two rows
    assert not ne.norm_epilogue_applies(x.float(), 12, res.float(), g_w)  # float32
    assert not ne.norm_epilogue_applies(x, 12, res[:, :10], g_w)  # width
    assert not ne.norm_epilogue_applies(x, 12, res.to(F16), g_w)  # residual dtype
    with pytest.raises(ValueError, match="residual"):
        gv.gemv_then_add_rms_norm(x, w, res[:, :10], g_w, 1e-5)


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_ops_linear_add_rms_norm(dtype):
    """``TritonOps.linear_add_rms_norm`` (fused at one 16-bit row, else the two ops) against the
    oracle; at two rows and in float32 it takes the unfused path."""
    for rows in (1, 2):
        g = torch.Generator().manual_seed(5 + rows)
        x = torch.randn(rows, 64, generator=g).to(DEV, dtype)
        w = (torch.randn(24, 64, generator=g) * 0.1).to(DEV, dtype)
        res = torch.randn(rows, 24, generator=g).to(DEV, dtype)
        g_w = torch.randn(24, generator=g).to(DEV, dtype)
        want = linear_add_rms_norm(x.cpu().float(), w.cpu().float(), res.cpu().float(),
                                   g_w.cpu().float(), 1e-6)
        out, new_res = OPS.linear_add_rms_norm(x, w, res.clone(), g_w, 1e-6)
        tol = dict(atol=8e-2, rtol=2e-2) if dtype == BF16 else dict(atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(new_res.float().cpu(), want[1], **tol)
        torch.testing.assert_close(out.float().cpu(), want[0], **tol)


_COMPILE = r"""
import json
from tessellm.kernels.gemm import gemv, gemv_x2
from tests.kernels.offline_compile import sm90_counts

bf, f32 = "*bf16", "*fp32"
norm = dict(res_ptr=bf, g_ptr=bf, normed_ptr=bf, counter_ptr="*i32")
pre = dict(PRE_TILES=1, PRE_L2=False, PRE_S=True, USE_PDL=True, NORM_EPI=True, NORM_BLOCK=4096,
           SPLIT_LAST=0)
found = {
    "x2": sm90_counts(gemv_x2._gemv_e4m3_x2_kernel,
                      dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=f32, out_ptr=bf, **norm),
                      dict(HAS_BIAS=False, EVEN_K=True, BLOCK_N=2, BLOCK_KW=512, PTX=True,
                           SILU_FOLD=False, **pre)),
    "fma": sm90_counts(gemv._gemv_fma_kernel,
                       dict(x_ptr=bf, w_ptr=bf, s_ptr=bf, bias_ptr=bf, out_ptr=bf, **norm),
                       dict(W_FP8=False, W_PTX=False, HAS_BIAS=False, EVEN_K=True, BLOCK_M=1,
                            BLOCK_N=2, BLOCK_K=1024, STAGES=1, CHUNK=8, F32_BITS=False, PTX=True,
                            SILU_FOLD=False, **pre)),
}
print("RESULT" + json.dumps(found))
"""


def test_norm_epilogue_compiles_for_sm90():
    """Both GEMV kernels with NORM_EPI compiled for sm_90 (no GPU needed): the counter is a
    gpu-scope acq_rel atomic after a CTA barrier, the output row is read back past L1
    (``ld.global.cg``), the squares are ``mul.rn.f32`` (not contracted into the sum), and the
    PDL pair stays."""
    import json

    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, k in found.items():
        assert k["atom_acq_rel"] >= 1, (name, k)
        assert k["mul_rn"] >= 1 and k["ld_cg"] >= 1 and k["bar"] >= 1, (name, k)
        assert k["pdl"] >= 2, (name, k)


@pytest.mark.parametrize("fp8", [False, True])
def test_rows_of_several_chunks(fp8):
    """A row longer than ``NORM_CHUNK`` (two chunks and a ragged tail on the CPU, the o / down
    shapes' eight on a GPU): the chunked sum of squares is the whole row's pairwise tree, so
    the bits are those of the norm kernel."""
    n, k = (520, 32) if not ON_GPU else (4096, 4096)
    x, w, res, g_w, _ = _data(n, k, BF16, False, 6)
    r1, r2 = res.clone(), res.clone()
    if fp8:
        q = quantize_fp8(w)
        y = gemv_x2.gemv_fp8_x2(x, q.qweight, q.scales, split_k=1)
        fused = gemv_x2.gemv_fp8_x2_then_add_rms_norm(x, q.qweight, q.scales, r1, g_w, 1e-5)
    else:
        w = w.to(BF16)
        y = gv.gemv(x, w)
        fused = gv.gemv_then_add_rms_norm(x, w, r1, g_w, 1e-5)
    unfused = OPS.fused_add_rms_norm(y, r2, g_w, 1e-5)
    assert torch.equal(fused[1], unfused[1]) and torch.equal(fused[0], unfused[0])
