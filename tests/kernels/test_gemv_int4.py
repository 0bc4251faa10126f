"""The dense int4 (W4A16) kernels of the cuda backend against the pure-torch reference
(``TorchQuantOps.int4_mm``): the decode GEMV (``gemv_int4``, 1-4 rows) and the tiled GEMM
(``weight_only.int4_gemm``, each packed word loaded once), on weights in the layouts AWQ and
GPTQ checkpoints load to (AWQ: asymmetric, zero codes per group; GPTQ: symmetric zero point 8,
or asymmetric with act order), groups of 32/64/128 or one per channel, bias, K not a multiple
of a step. Triton's interpreter on a CPU (tiny sizes), the GPU where there is one."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.quant_ops import TorchQuantOps  # noqa: E402
from tessellm.kernels.gemm import gemv_int4 as gi  # noqa: E402
from tessellm.kernels.gemm import quant_ops  # noqa: E402
from tessellm.kernels.gemm import weight_only as wo  # noqa: E402
from tessellm.quantization.int4 import (pack_awq, pack_gptq_zeros,  # noqa: E402
                                        unpack_awq, unpack_gptq_zeros)
from tessellm.quantization.packed import (Int4Weight, pack_int4, quantize_int4,  # noqa: E402
                                          unpack_int4)

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REF = TorchQuantOps()
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2, torch.float16: 2e-3}


def _weight(layout: str, n: int, k: int, group: int, seed: int = 0) -> Int4Weight:
    """An ``Int4Weight`` as ``Int4Method`` builds it from an AWQ / GPTQ checkpoint's tensors
    (packed in the checkpoint's own layout, then unpacked and repacked the loader's way)."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=gen) * 0.05
    if layout == "gptq-sym":
        q, s, _ = quantize_int4(w, group, symmetric=True)
        packed_q, packed_z = pack_int4(q), pack_gptq_zeros(torch.full((k // group, n), 8))
        q, zeros = unpack_int4(packed_q), unpack_gptq_zeros(packed_z).to(torch.int32)
        assert bool((zeros == 8).all())
        return Int4Weight(pack_int4(q), s.half(), None, 8, group).to(DEV)
    q, s, z = quantize_int4(w, group)
    perm = None
    if layout == "awq":
        q, zeros = unpack_awq(pack_awq(q)), unpack_awq(pack_awq(z)).to(torch.int32)
    else:  # "gptq-act-order": rows sorted by group at load, x gathered through perm
        q, zeros = unpack_int4(pack_int4(q)), unpack_gptq_zeros(pack_gptq_zeros(z))
        perm = torch.randperm(k, generator=gen).to(torch.int32)
    return Int4Weight(pack_int4(q), s, -(zeros.float() * s.float()), 0, group, perm).to(DEV)


def _check(got, x, w, bias, dtype):
    want = REF.int4_mm(x.float(), w, None if bias is None else bias.float())
    assert got.shape == want.shape and got.dtype == dtype
    rel = ((got.float() - want).norm() / want.norm()).item()
    assert rel < TOL[dtype], f"relative error {rel:.2e}"


# (rows, N, K, group): groups of 32/64/128, one group per channel with K not a power of two
# (a partial last step), N not a multiple of a program's columns, 17 words of K in groups of 8
CASES = [(1, 64, 256, 32), (2, 48, 256, 64), (3, 40, 512, 128), (4, 72, 200, 200),
         (1, 56, 136, 8)]


@pytest.mark.parametrize("layout", ["awq", "gptq-sym", "gptq-act-order"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "x".join(map(str, c)))
def test_gemv_int4_matches_the_reference(layout, case):
    m, n, k, group = case
    w = _weight(layout, n, k, group, seed=k + n)
    gen = torch.Generator().manual_seed(m)
    x = torch.randn(m, k, generator=gen).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV) if layout != "gptq-sym" else None
    _check(gi.gemv_int4(x, w, bias), x, w, bias, torch.float32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gemv_int4_half_activations(dtype):
    w = _weight("awq", 64, 512, 128, seed=3)
    x = torch.randn(2, 512, generator=torch.Generator().manual_seed(4)).to(DEV, dtype)
    bias = torch.randn(64, generator=torch.Generator().manual_seed(5)).to(DEV, dtype)
    _check(gi.gemv_int4(x, w, bias), x, w, bias, dtype)


def test_gemv_int4_split_k_with_a_ragged_last_range(monkeypatch):
    """K split over 3 programs whose ranges end off a step (the masked path the GPU's split
    takes when the steps do not divide evenly); bias added once."""
    config = gi.gemv_int4_config

    def split3(*args, **kw):
        t = config(*args, **kw)
        return dict(t, SPLIT_K=3, EVEN_K=False, grid=(t["grid"][0], 3))

    monkeypatch.setattr(gi, "gemv_int4_config", split3)
    w = _weight("awq", 40, 320, 32, seed=7)
    x = torch.randn(3, 320, generator=torch.Generator().manual_seed(8)).to(DEV)
    bias = torch.randn(40, generator=torch.Generator().manual_seed(9)).to(DEV)
    _check(gi.gemv_int4(x, w, bias), x, w, bias, torch.float32)


def test_gemv_int4_refuses_more_rows():
    w = _weight("awq", 32, 64, 32)
    with pytest.raises(ValueError, match="1 to 4 rows"):
        gi.gemv_int4(torch.zeros(gi.INT4_GEMV_MAX_M + 1, 64, device=DEV), w)


@pytest.mark.parametrize("layout", ["awq", "gptq-sym", "gptq-act-order"])
@pytest.mark.parametrize("m, n, k, group", [(5, 64, 256, 32), (17, 40, 256, 64),
                                            (6, 64, 512, 128), (5, 48, 200, 200)])
def test_tiled_int4_gemm_matches_the_reference(layout, m, n, k, group):
    """The tiled GEMM (5+ rows): codes exact in the dot, so float32 agrees to reassociation."""
    w = _weight(layout, n, k, group, seed=m + k)
    gen = torch.Generator().manual_seed(n)
    x = torch.randn(m, k, generator=gen).to(DEV)
    bias = torch.randn(n, generator=gen).to(DEV)
    _check(wo.int4_gemm(x, w, bias), x, w, bias, torch.float32)


def test_int4_mm_dispatch_by_rows():
    """TritonQuantOps.int4_mm: the GEMV up to INT4_GEMV_MAX_M rows, the tiled GEMM above,
    both equal to the reference."""
    ops = quant_ops.TritonQuantOps()
    w = _weight("awq", 48, 256, 64, seed=11)
    for m in (1, gi.INT4_GEMV_MAX_M, gi.INT4_GEMV_MAX_M + 1):
        x = torch.randn(m, 256, generator=torch.Generator().manual_seed(m)).to(DEV)
        got = ops.int4_mm(x, w)
        path = gi.gemv_int4 if m <= gi.INT4_GEMV_MAX_M else wo.int4_gemm
        assert torch.equal(got, path(x, w))
        _check(got, x, w, None, torch.float32)



@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiled_int4_gemm_half_activations(dtype):
    """16-bit x: the codes widened by bits (``_codes_to_16bit``; bf16 on a GPU only)."""
    for layout in ("awq", "gptq-sym"):
        w = _weight(layout, 64, 256, 64, seed=13)
        x = torch.randn(9, 256, generator=torch.Generator().manual_seed(14)).to(DEV, dtype)
        _check(wo.int4_gemm(x, w), x, w, None, dtype)
