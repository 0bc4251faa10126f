"""TESSELLM_GEMV_PREWAIT: the one-row GEMVs reading weight tiles, scales and bias before their
PDL wait (``gemv.Prewait``). The same K steps are summed in the same order, so every output is
bitwise the output without it, and within tolerance of the float32 reference; programs with
fewer K steps than pre-loaded tiles (short K, the last split of a split K) add nothing twice.
On a GPU the launches run under ``graph_scope`` (PDL on sm90+, so the L2 requests compile and
run there); on the CPU in Triton's interpreter, where the L2 request is left out.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm import envs  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_x2  # noqa: E402
from tessellm.kernels.pdl import graph_scope  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16 = torch.bfloat16
# In the interpreter (no L2 request there) two: one tile; two tiles (more than some programs'
# K steps) with the scales
PREWAITS = [gv.Prewait(1), gv.Prewait(2, l2=True, scales=True)]
if ON_GPU:  # and the L2 request alone
    PREWAITS += [gv.Prewait(0, l2=True)]
# (N, K): K = 100 leaves a partial K step (every config below); split K leaves the last split
# a single step; on a GPU also a layer's K
SHAPES = [(19, 100)] + ([(1031, 4096)] if ON_GPU else [])


def _data(m, n, k, bias, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(DEV, BF16)
    b = torch.randn(n, generator=g).to(DEV, BF16) if bias else None
    return w, x, b


def _both(monkeypatch, pre, fn):
    """fn() without anything before the wait, then with ``pre`` (under PDL on a GPU)."""
    with graph_scope():
        monkeypatch.setattr(gv, "PREWAIT", gv.Prewait())
        base = fn()
        monkeypatch.setattr(gv, "PREWAIT", pre)
        out = fn()
    return base, out


def _close(out, ref, tol=8e-3):
    rel = ((out.double() - ref.double()).norm() / ref.double().norm()).item()
    assert rel < tol, rel


@pytest.mark.parametrize("pre", PREWAITS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_x2_prewait_is_bitwise_the_plain_kernel(monkeypatch, shape, pre):
    """``gemv_fp8_x2`` (tiled kernel: split K, partial steps, fewer steps than tiles) and its
    SiLU fold, with and without the pre-wait reads."""
    n, k = shape
    for i, (tiles, split) in enumerate([((2, 8, 1), 1), ((4, 16, 1), 3), (None, None)]):
        w, x, b = _data(1, n, k, i % 2 == 1, i)
        seg = quantize_fp8(w).to(DEV)
        base, out = _both(monkeypatch, pre, lambda: gemv_x2.gemv_fp8_x2(
            x, seg.qweight, seg.scales, b, config=tiles, split_k=split))
        assert torch.equal(out, base)
        ref = x.float() @ seg.dequantize().float().t() + (b.float() if b is not None else 0)
        _close(out, ref)
    seg = quantize_fp8(_data(1, 2 * n, k, False, 7)[0]).to(DEV)
    base, out = _both(monkeypatch, pre, lambda: gemv_x2.gemv_fp8_x2_silu_and_mul(
        x, seg.qweight, seg.scales, config=(4, 8, 1)))
    assert torch.equal(out, base)
    gu = x.float() @ seg.dequantize().float().t()
    _close(out, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], 2e-2)


@pytest.mark.parametrize("pre", PREWAITS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_fma_prewait_is_bitwise_the_plain_kernel(monkeypatch, shape, pre):
    """``gemv`` (bf16 weights, 1-3 rows, chunked and plain tiles, split K), ``gemv_fp8`` and
    ``gemv_silu_and_mul`` through the FMA kernel, with and without the pre-wait reads."""
    n, k = shape
    cfgs = [gv.GemvConfig(block_n=2, block_k=32, num_warps=1, stages=1, chunk=8),
            gv.GemvConfig(block_n=4, block_k=16, num_warps=1, stages=1, split_k=3), None]
    for m, cfg in zip((1, 3, 2), cfgs):  # None: the FMA tiles of 1-2 rows
        i = m
        w, x, b = _data(m, n, k, i % 2 == 0, 10 + i)
        wb = w.to(DEV, BF16)
        base, out = _both(monkeypatch, pre, lambda: gv.gemv(x, wb, b, config=cfg))
        assert torch.equal(out, base)
        _close(out, x.float() @ wb.float().t() + (b.float() if b is not None else 0))
        seg = quantize_fp8(w).to(DEV)
        base, out = _both(monkeypatch, pre, lambda: gv.gemv_fp8(x, seg.qweight, seg.scales,
                                                               config=cfg))
        assert torch.equal(out, base)
        _close(out, x.float() @ seg.dequantize().float().t())
    w, x, _ = _data(2, 2 * n, k, False, 20)
    wb = w.to(DEV, BF16)
    base, out = _both(monkeypatch, pre, lambda: gv.gemv_silu_and_mul(x, wb))
    assert torch.equal(out, base)
    gu = x.float() @ wb.float().t()
    _close(out, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], 2e-2)


def test_prewait_env(monkeypatch):
    for value, want in (("", (0, False, False)), ("0", (0, False, False)),
                        ("2", (2, False, False)), ("2+s", (2, False, True)),
                        ("l2", (0, True, False)), ("1+l2+s", (1, True, True))):
        monkeypatch.setenv("TESSELLM_GEMV_PREWAIT", value)
        assert envs.gemv_prewait() == want
    for bad in ("3", "regs", "1+2", "l2+l2"):
        monkeypatch.setenv("TESSELLM_GEMV_PREWAIT", bad)
        with pytest.raises(ValueError, match="TESSELLM_GEMV_PREWAIT"):
            envs.gemv_prewait()
    monkeypatch.delenv("TESSELLM_GEMV_PREWAIT")
    assert envs.gemv_prewait() == (1, False, False)  # the default: one tile before the wait


def test_l2_request_only_where_it_compiles_and_helps(monkeypatch):
    """The L2 request is asked of the kernel only compiled on NVIDIA sm90+ under PDL."""
    monkeypatch.setattr(gv, "PREWAIT", gv.Prewait(1, l2=True, scales=True))
    x = torch.zeros(1, 8, device=DEV, dtype=BF16)
    assert gv.prewait_args(x) == {"PRE_TILES": 1, "PRE_L2": False, "PRE_S": True}
    with graph_scope():
        sm90 = ON_GPU and torch.version.hip is None and \
            torch.cuda.get_device_capability()[0] >= 9 and envs.cuda_pdl()
        assert gv.prewait_args(x)["PRE_L2"] == sm90
