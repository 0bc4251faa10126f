"""The cuda backend's tensor-core W4A16 GEMM (``kernels/gemm/int4_tc.py``, 5+ rows) on the codes
re-laid at load, against the float64 product with the dequantized weight and against the
checkpoint-layout tiled GEMM (``weight_only.int4_gemm``): AWQ (asymmetric, offsets), GPTQ
symmetric (zero point 8) and asymmetric with act order, groups of 128 / 256 or one per channel,
bias, ragged N and M, K split over 1-3 programs. Plus the layout itself, its dequantize kernel,
and the load-time hook (``Int4Method`` -> ``TritonQuantOps.prepare_int4``). Triton's
interpreter on a CPU (tiny sizes), the GPU where there is one (also the row tiers)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.spec import QuantSpec  # noqa: E402
from tessellm.kernels.gemm import int4_tc as tc  # noqa: E402
from tessellm.kernels.gemm import quant_ops  # noqa: E402
from tessellm.kernels.gemm import weight_only as wo  # noqa: E402
from tessellm.quantization import make_quant_method  # noqa: E402
from tessellm.quantization.int4 import (pack_awq, pack_gptq_zeros, unpack_awq,  # noqa: E402
                                        unpack_gptq_zeros)
from tessellm.quantization.packed import (Int4Weight, pack_int4, quantize_int4,  # noqa: E402
                                          unpack_int4)

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# largest error over the largest output: float32 to reassociation; 16-bit: the output rounding
TOL = {F32: 1e-5, F16: 2e-3, BF16: 1e-2}


def _weight(layout: str, n: int, k: int, group: int, seed: int = 0) -> Int4Weight:
    """An ``Int4Weight`` as ``Int4Method`` builds it from an AWQ / GPTQ checkpoint (packed in
    the checkpoint's own layout, unpacked and repacked the loader's way), plus its tc layout."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if layout == "gptq-sym":
        q, s, _ = quantize_int4(w, group, symmetric=True)
        seg = Int4Weight(pack_int4(q), s.half(), None, 8, group)
    else:
        q, s, z = quantize_int4(w, group)
        perm = None
        if layout == "awq":
            q, zeros = unpack_awq(pack_awq(q)), unpack_awq(pack_awq(z)).to(torch.int32)
        else:  # "gptq-act-order"
            q, zeros = unpack_int4(pack_int4(q)), unpack_gptq_zeros(pack_gptq_zeros(z))
            perm = torch.randperm(k, generator=gen).to(torch.int32)
        seg = Int4Weight(pack_int4(q), s, -(zeros.float() * s.float()), 0, group, perm)
    seg = seg.to(DEV)
    seg.tc_qweight = tc.int4_tc_pack(seg.qweight, chunk=24)  # chunks: the packer's column loop
    return seg


def _check(got, x, w, bias, dtype):
    ref = x.double() @ w.dequantize(torch.float64).to(DEV).t()
    if bias is not None:
        ref = ref + bias.double()
    assert got.shape == ref.shape and got.dtype == dtype
    err = ((got.double() - ref).abs().max() / ref.abs().max()).item()
    assert err < TOL[dtype], f"error {err:.2e}"


def test_tc_layout_round_trip_and_order():
    """Nibble i of word j of block b holds input 128 b + 16 i + j (the layout's definition)."""
    k, n = 256, 40
    q = torch.randint(0, 16, (k, n), generator=torch.Generator().manual_seed(0))
    qt = tc.int4_tc_pack(pack_int4(q).to(DEV), chunk=16)
    assert qt.shape == (n, k // 8) and qt.dtype == torch.int32
    assert torch.equal(tc.int4_tc_unpack(qt).cpu(), q.to(torch.uint8))
    b, i, j, col = 1, 5, 3, 7
    word = int(qt[col, 16 * b + j]) & 0xFFFFFFFF
    assert (word >> (4 * i)) & 0xF == int(q[128 * b + 16 * i + j, col])
    with pytest.raises(ValueError, match="multiple of 128"):
        tc.int4_tc_pack(pack_int4(q[:136]))


@pytest.mark.parametrize("layout", ["awq", "gptq-sym", "gptq-act-order"])
@pytest.mark.parametrize("m, n, k, group, split", [(5, 48, 256, 128, 1), (17, 40, 384, 128, 3),
                                                   (9, 64, 512, 256, 2), (6, 32, 256, 256, 1)])
def test_tc_gemm_matches_the_float64_product(layout, m, n, k, group, split):
    """float32 x (codes exact, scales per block); group 256 = K is one group per channel."""
    w = _weight(layout, n, k, group, seed=m + k)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV) if layout != "gptq-sym" else None
    got = tc.int4_tc_gemm(x, w, bias, split=split)
    _check(got, x, w, bias, F32)
    old = wo.int4_gemm(x, w, bias)  # the checkpoint layout's tiled GEMM
    assert ((got - old).abs().max() / old.abs().max()).item() < 1e-5


@pytest.mark.parametrize("dtype", [BF16, F16])
@pytest.mark.parametrize("layout", ["awq", "gptq-sym"])
def test_tc_gemm_half_activations(dtype, layout):
    """16-bit x: codes widened by bits (fp16 1024 + q, bf16 128 + q; the bias taken off by x's
    column sums), split in two (float32 planes) and not."""
    w = _weight(layout, 72, 256, 128, seed=13)
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(11, 256, generator=gen).to(DEV, dtype)
    bias = torch.randn(72, generator=gen).to(DEV, dtype)
    for split in (1, 2):
        _check(tc.int4_tc_gemm(x, w, bias, split=split), x, w, bias, dtype)


@pytest.mark.parametrize("dtype", [F32, BF16])
def test_tc_dequantize_kernel(dtype):
    """The large-M path's dense weight from the tc layout: exactly the format's weight (one
    rounding to dtype)."""
    w = _weight("awq", 40, 256, 128, seed=5)
    tol = dict(rtol=2**-22, atol=1e-7) if dtype == F32 else dict(rtol=2**-7, atol=1e-6)
    got = tc.int4_tc_dequantize(w, dtype)
    # rows in the permuted order as the checkpoint-layout kernel's
    torch.testing.assert_close(got, wo.int4_dequantize(w, dtype), **tol)
    w = _weight("gptq-sym", 40, 256, 128, seed=6)
    torch.testing.assert_close(tc.int4_tc_dequantize(w, dtype),
                               w.dequantize(torch.float32).to(DEV, dtype), **tol)


def test_tc_gemm_refuses_a_weight_without_the_layout():
    w = _weight("awq", 32, 128, 128)
    w.tc_qweight = None
    with pytest.raises(ValueError, match="tc layout"):
        tc.int4_tc_gemm(torch.zeros(5, 128, device=DEV), w)


@pytest.mark.parametrize("fmt", ["awq", "gptq"])
def test_load_hook_lays_out_and_int4_mm_dispatches(fmt, monkeypatch):
    """``Int4Method.process_weights_after_loading`` hands each int4 segment to the cuda ops'
    ``prepare_int4``: the tc layout where K and the group are multiples of 128 (not for groups
    of 32). ``TESSELLM_INT4_TC_GEMV=1`` (the default) keeps the tc layout only (``qweight``
    emptied, the dequantized weight unchanged): ``int4_mm`` takes ``int4_tc_gemv`` at one row and
    the tc GEMM from two; with ``=0`` both layouts, the GEMV at 1-4 rows and the tc GEMM at 5.
    ``TESSELLM_INT4_TC=0`` keeps the checkpoint layout only. Each equal to the reference."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(48, 256, generator=gen).to(DEV)
    for group, on in ((128, True), (32, False)):
        for env, gemv in (("1", "0"), ("0", "0"), ("1", "1")):
            monkeypatch.setenv("TESSELLM_INT4_TC", env)
            monkeypatch.setenv("TESSELLM_INT4_TC_GEMV", gemv)
            ops = quant_ops.TritonQuantOps()
            method = make_quant_method(QuantSpec(fmt, dtype=F32, config={"group_size": group}),
                                       ops)
            layer = torch.nn.Module()
            with torch.device(DEV):
                method.create_weights(layer, 256, 48, F32)
            method.quantize_dense(layer, weight)
            staged = {k: v.clone() for k, v in layer.quant_staged[None].items()}
            method.process_weights_after_loading(layer)
            (seg,) = layer.segments
            tc_on = on and env == "1"
            assert (seg.tc_qweight is not None) == tc_on
            assert seg.qweight.shape[0] == (0 if tc_on and gemv == "1" else 256 // 8)
            # the dequantized weight is the checkpoint's whichever layouts are kept
            ref = make_quant_method(QuantSpec(fmt, dtype=F32, config={"group_size": group}),
                                    quant_ops.TritonQuantOps(int4_tc=False))
            ref_layer = torch.nn.Module()
            with torch.device(DEV):
                ref.create_weights(ref_layer, 256, 48, F32)
            for name, t in staged.items():
                ref.load_weight(ref_layer, name, t, None)
            ref.process_weights_after_loading(ref_layer)
            assert torch.equal(seg.dequantize(), ref_layer.segments[0].dequantize())
            for m in (1, 3, 5):
                x = torch.randn(m, 256, generator=gen).to(DEV)
                got = method.apply(layer, x)
                _check(got, x, seg, None, F32)
                if seg.tc_qweight is not None:
                    # the tc layout alone: the tc GEMV at one row, the tc GEMM from two
                    path = tc.int4_tc_gemm if m > 4 or (gemv == "1" and m > 1) else (
                        tc.int4_tc_gemv if gemv == "1" else None)
                    if path is not None:
                        assert torch.equal(got, path(x, seg))


@pytest.mark.skipif(not ON_GPU, reason="the row tiers, split-K and cuBLAS path are GPU choices")
@pytest.mark.parametrize("m", [5, 16, 17, 32, 64, 65, 200, 600])
def test_tc_row_tiers_on_gpu(m):
    """Every tile tier by rows at a realistic shape, default split-K, through ``int4_mm``
    (600 rows: the tc dequantize kernel and cuBLAS), bf16."""
    w = _weight("awq", 1536, 2048, 128, seed=m)
    x = torch.randn(m, 2048, generator=torch.Generator().manual_seed(m)).to(DEV, BF16)
    _check(quant_ops.TritonQuantOps().int4_mm(x, w), x, w, None, BF16)
    _check(tc.int4_tc_gemm(x, w), x, w, None, BF16)


@pytest.mark.parametrize("layout", ["awq", "gptq-sym", "gptq-act-order"])
@pytest.mark.parametrize("m, n, k, group, split", [(1, 48, 256, 128, 1), (2, 40, 384, 128, 3),
                                                   (3, 64, 512, 256, 2), (4, 32, 256, 256, 1)])
def test_tc_gemv_matches_the_float64_product(layout, m, n, k, group, split):
    """The 1-4-row GEMV on the tc layout: float32 FMAs, exact codes, per-block scales."""
    w = _weight(layout, n, k, group, seed=m + k + 1)
    gen = torch.Generator().manual_seed(n + 1)
    x = torch.randn(m, k, generator=gen).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV) if layout != "gptq-sym" else None
    _check(tc.int4_tc_gemv(x, w, bias, split=split), x, w, bias, F32)
    x16 = x.to(BF16)
    _check(tc.int4_tc_gemv(x16, w, None if bias is None else bias.to(BF16), split=split), x16, w,
           None if bias is None else bias.to(BF16), BF16)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        tc.int4_tc_gemv(torch.zeros(5, k, device=DEV), w)


@pytest.mark.skipif(not ON_GPU, reason="split-K by the SM count is a GPU choice")
@pytest.mark.parametrize("m", [1, 2, 4])
def test_tc_gemv_on_gpu(m):
    """The tc GEMV at a realistic shape with its default split-K, bf16, with and without
    offsets."""
    for layout in ("awq", "gptq-sym"):
        w = _weight(layout, 1536, 4096, 128, seed=m)
        x = torch.randn(m, 4096, generator=torch.Generator().manual_seed(m)).to(DEV, BF16)
        _check(tc.int4_tc_gemv(x, w), x, w, None, BF16)
