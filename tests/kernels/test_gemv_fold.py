"""The residual-add RMSNorm split between two one-row GEMVs (``gemm/norm_fold.py``,
``gemm/gemv_fold.py``): the producer's half (o / down: new residual, ``round(h * g)``, partial
sums of squares) and the consumer's (qkv / gate_up: the sums times rstd) against a float64
oracle, and the pair against the unfused path (GEMV, ``fused_add_rms_norm``, GEMV). On a GPU
and in the interpreter alike; N spans several programs and is ragged, outputs are NaN-filled
first on a GPU."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_fold as gf  # noqa: E402
from tessellm.kernels.gemm import gemv_x2  # noqa: E402
from tessellm.kernels.gemm import norm_fold as nf  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16 = torch.bfloat16, torch.float16
OPS = TritonOps()
# (producer N = consumer K, producer K, consumer N)
SHAPES = [(4096, 4096, 6144), (4096, 14336, 28672), (1030, 512, 2052)] if ON_GPU \
    else [(50, 64, 36), (96, 32, 20)]
# the x2 kernels read K in words of 4: the producer's N (the consumer's K) a multiple of 4
X2_SHAPES = [(4096, 4096, 6144), (1028, 512, 2052)] if ON_GPU else [(52, 64, 36), (96, 32, 20)]
X2_CONFIGS = {"default": None, "bn8": (8, 8, 1)}  # (block_n, words, warps): 52 = 6.5 x 8
EPS = 1e-5


def _data(h, k, n, dtype, seed):
    g = torch.Generator().manual_seed(seed + 7 * n + k)
    x = torch.randn(1, k, generator=g).to(DEV, dtype)
    w_o = torch.randn(h, k, generator=g) * k ** -0.5
    res = (torch.randn(1, h, generator=g) * 2).to(DEV, dtype)
    g_w = (1 + 0.5 * torch.randn(h, generator=g)).to(DEV, dtype)
    w_c = torch.randn(n, h, generator=g) * h ** -0.5
    b = torch.randn(n, generator=g).to(DEV, dtype)
    return x, w_o.to(DEV), res, g_w, w_c.to(DEV), b


def _oracle_out(y, res, g_w, dtype):
    """The producer's half in float64 from the product ``y`` as the GEMV rounds it."""
    h = (y.to(dtype).double() + res.double()).to(dtype)
    hd = h.double()
    return h, (hd * g_w.double()).to(dtype), (hd * hd).sum()


def _check_out(xg, sumsq, res, y, res_before, g_w, dtype):
    """The producer's outputs: the new residual bitwise the unfused add-RMSNorm kernel's
    (kernel against kernel: Triton's interpreter rounds float32 to bf16 toward zero), all three
    within a rounding of the float64 oracle."""
    assert torch.isfinite(xg).all() and torch.isfinite(sumsq).all()
    assert sumsq.dtype == torch.float32 and sumsq.numel() & (sumsq.numel() - 1) == 0
    _, unfused_res = OPS.fused_add_rms_norm(y, res_before.clone(), g_w, EPS)
    assert torch.equal(res, unfused_res), "the new residual is round(round(y) + residual)"
    want_h, want_xg, want_ss = _oracle_out(y, res_before, g_w, dtype)
    ulp = 2 ** -7 if dtype == BF16 else 2 ** -10
    torch.testing.assert_close(res.double(), want_h.double(), atol=0, rtol=ulp)
    torch.testing.assert_close(xg.double(), res.double() * g_w.double(), atol=0, rtol=ulp)
    torch.testing.assert_close(sumsq.double().sum(), want_ss, rtol=2 * ulp, atol=0)
    hd = res.double()
    torch.testing.assert_close(sumsq.double().sum(), (hd * hd).sum(), rtol=1e-5, atol=0)


@pytest.mark.parametrize("h,k,n", SHAPES)
@pytest.mark.parametrize("dtype,bias", [(BF16, False), (F16, True)])
def test_gemv_fold_pair(h, k, n, dtype, bias):
    """The 16-bit pair: producer then consumer (plain and SiLU-and-mul) against the float64
    oracle and the unfused three launches."""
    x, w_o, res, g_w, w_c, b = _data(h, k, n, dtype, 1)
    w_o, w_c = w_o.to(dtype), w_c.to(dtype)
    b_o = b[:1].expand(h).contiguous() if bias else None
    y = gv.gemv(x, w_o, b_o)  # the plain product, as the producer rounds it
    r1 = res.clone()
    xg, sumsq = gf.gemv_add_rms_norm_fold(x, w_o, r1, g_w, b_o)
    _check_out(xg, sumsq, r1, y, res, g_w, dtype)
    rstd = 1 / torch.sqrt(sumsq.double().sum() / h + EPS)
    normed, _ = OPS.fused_add_rms_norm(y, res.clone(), g_w, EPS)
    bc = b if bias else None
    for silu in (False, True):
        out = gf.gemv_rms_scaled(xg, w_c, sumsq, EPS, bc, silu_and_mul=silu)
        want = (xg.double() @ w_c.double().T) * rstd
        if bc is not None:
            want = want + bc.double()
        if silu:
            want = want.to(dtype).double()  # the GEMV rounds gate and up first
            gate, up = want.chunk(2, dim=-1)
            want = gate * torch.sigmoid(gate) * up
        tol = 2e-2 if dtype == BF16 else 4e-3
        torch.testing.assert_close(out.double(), want, atol=tol, rtol=tol)
        # against the unfused path: the norm, then the plain GEMV
        plain = (OPS.linear_silu_and_mul if silu else OPS.linear)(normed, w_c, bc)
        torch.testing.assert_close(out.double(), plain.double(), atol=3 * tol, rtol=3 * tol)


@pytest.mark.parametrize("h,k,n", X2_SHAPES)
@pytest.mark.parametrize("cfg", list(X2_CONFIGS))
def test_gemv_fp8_x2_fold_pair(h, k, n, cfg):
    """The e4m3 pair (bf16 row): as the 16-bit one, on both x2 launch shapes."""
    x, w_o, res, g_w, w_c, b = _data(h, k, n, BF16, 2)
    qo, qc = quantize_fp8(w_o), quantize_fp8(w_c)
    config = X2_CONFIGS[cfg]
    y = gemv_x2.gemv_fp8_x2(x, qo.qweight, qo.scales, None, config=config, split_k=1)
    r1 = res.clone()
    xg, sumsq = gf.gemv_fp8_x2_add_rms_norm_fold(x, qo.qweight, qo.scales, r1, g_w,
                                                 config=config)
    _check_out(xg, sumsq, r1, y, res, g_w, BF16)
    rstd = 1 / torch.sqrt(sumsq.double().sum() / h + EPS)
    wc = qc.qweight.double() * qc.scales.double()[:, None]
    for silu in (False, True):
        out = gf.gemv_fp8_x2_rms_scaled(xg, qc.qweight, qc.scales, sumsq, EPS, b,
                                        silu_and_mul=silu, config=config)
        want = (xg.double() @ wc.T) * rstd + b.double()
        if silu:
            want = want.to(BF16).double()
            gate, up = want.chunk(2, dim=-1)
            want = gate * torch.sigmoid(gate) * up
        torch.testing.assert_close(out.double(), want, atol=3e-2, rtol=3e-2)
        normed, _ = OPS.fused_add_rms_norm(y, res.clone(), g_w, EPS)
        plain = gemv_x2.gemv_fp8_x2(normed, qc.qweight, qc.scales, b, config=config)
        if silu:
            plain = OPS.silu_and_mul(plain)
        torch.testing.assert_close(out.double(), plain.double(), atol=6e-2, rtol=6e-2)


def test_partials_tail_zeroed():
    """The producer's partials buffer is a power of two; program 0 zeroes what lies past the
    grid (the consumer sums the whole tile)."""
    x, w_o, res, g_w, _, _ = _data(50, 64, 8, BF16, 3)
    cfg = gv.GemvConfig(block_n=4, block_k=32, num_warps=1, stages=1)
    r = res.clone()
    _, sumsq = gf.gemv_add_rms_norm_fold(x, w_o.to(BF16), r, g_w, config=cfg)
    assert sumsq.numel() == 16  # 13 programs
    assert torch.equal(sumsq[13:].cpu(), torch.zeros(3))
    sq = torch.nn.functional.pad(r.float().cpu() ** 2, (0, 2)).reshape(13, 4)  # a program's 4
    torch.testing.assert_close(sumsq[:13].cpu(), sq.sum(1), rtol=1e-6, atol=0)


def test_applies_and_errors():
    x, w_o, res, g_w, w_c, _ = _data(50, 64, 8, BF16, 4)
    assert nf.fold_applies(x, 50, res, g_w)
    assert not nf.fold_applies(torch.cat([x, x]), 50, res, g_w)
    assert not nf.fold_applies(x.float(), 50, res.float(), g_w)
    assert not nf.fold_applies(x, 50, res.to(F16), g_w)
    assert not nf.consume_applies(x, torch.zeros(3, device=DEV))  # not a power of two
    assert not nf.consume_applies(x, torch.zeros(4, dtype=BF16, device=DEV))
    with pytest.raises(ValueError, match="residual"):
        gf.gemv_add_rms_norm_fold(x, w_o.to(BF16), res[:, :10], g_w)
    with pytest.raises(ValueError, match="power-of-two"):
        gf.gemv_rms_scaled(x[:, :50], w_c.to(BF16), torch.zeros(3, device=DEV), EPS)


_COMPILE = r"""
import json
from tessellm.kernels.gemm import gemv, gemv_x2
from tests.kernels.offline_compile import sm90_counts

bf, f32 = "*bf16", "*fp32"
norm = dict(res_ptr=bf, g_ptr=bf, normed_ptr=bf, counter_ptr=f32, y_ptr=bf, split_ctr_ptr="*i32")
found = {}
for mode, silu in ((2, False), (3, False), (3, True)):
    pre = dict(PRE_TILES=1, PRE_L2=False, PRE_S=True, USE_PDL=True, NORM_EPI=mode,
               NORM_BLOCK=2048, SILU_FOLD=silu, SPLIT_LAST=0)
    found[f"x2 {mode} {silu}"] = sm90_counts(
        gemv_x2._gemv_e4m3_x2_kernel,
        dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=f32, out_ptr=bf, **norm),
        dict(HAS_BIAS=False, EVEN_K=True, BLOCK_N=2, BLOCK_KW=512, PTX=True, **pre))
    found[f"fma {mode} {silu}"] = sm90_counts(
        gemv._gemv_fma_kernel,
        dict(x_ptr=bf, w_ptr=bf, s_ptr=bf, bias_ptr=bf, out_ptr=bf, **norm),
        dict(W_FP8=False, W_PTX=False, HAS_BIAS=False, EVEN_K=True, BLOCK_M=1, BLOCK_N=2,
             BLOCK_K=1024, STAGES=1, CHUNK=8, F32_BITS=False, PTX=True, **pre))
found = {name: counts["pdl"] for name, counts in found.items()}
print("RESULT" + json.dumps(found))
"""


def test_fold_kernels_compile_for_sm90():
    """Both GEMV kernels with the producer's and the consumer's epilogue (and the consumer
    with SiLU-and-mul) compile for sm_90 (no GPU needed), the PDL pair kept."""
    import json

    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    assert len(found) == 6 and all(n >= 2 for n in found.values()), found


def test_consumer_sums_many_partials():
    """The consumer sums a partials buffer of several 512-float chunks (Llama-8B's o / down
    tiles leave 2,048) in one fixed order: against torch's sum, bf16 and e4m3."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 64, generator=g).to(DEV, BF16)
    w = (torch.randn(12, 64, generator=g) * 0.1).to(DEV)
    sumsq = (torch.rand(2048, generator=g) * 3).to(DEV)
    rstd = 1 / torch.sqrt(sumsq.double().sum() / 64 + EPS)
    out = gf.gemv_rms_scaled(x, w.to(BF16), sumsq, EPS)
    want = (x.double() @ w.to(BF16).double().T) * rstd
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
    q = quantize_fp8(w)
    out = gf.gemv_fp8_x2_rms_scaled(x, q.qweight, q.scales, sumsq, EPS, config=(4, 8, 1))
    want = (x.double() @ (q.qweight.double() * q.scales.double()[:, None]).T) * rstd
    torch.testing.assert_close(out.double(), want, atol=2e-2, rtol=2e-2)
