"""Split-K one-row GEMVs combined in the launch (``kernels/gemm/split_last.py``,
TESSELLM_GEMV_SPLIT_LAST): each N tile's last program adds the K ranges' float32 planes in
order 0, 1, ... and stores the output. So the output is bitwise the plane path's planes (the
same kernel, the same K ranges) added in that order and rounded once, the same on every call
(the counters are left zero), and within tolerance of the float64 product. On a GPU the
launches also run under PDL (``graph_scope``) and inside a CUDA graph replayed twice; on the
CPU in Triton's interpreter (whose float32 -> bf16 cast truncates where the GPU rounds to
nearest even: ``_rounded``).
"""

from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

pytest.importorskip("triton")

from tessellm import envs  # noqa: E402
from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_x2, gemv_x2_table, split_last  # noqa: E402
from tessellm.kernels.pdl import graph_scope  # noqa: E402
from tessellm.quantization.packed import quantize_fp8  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16 = torch.bfloat16, torch.float16
# (N, K): K = 100 leaves a partial K step and a short last split; on a GPU also qkv / o
SHAPES = [(19, 100), (13, 64)] + ([(1031, 4096), (6144, 4096)] if ON_GPU else [])
# (block_n, block_kw, warps, split) of gemv_fp8_x2; the split as asked (the launch may take
# fewer: whole steps per range)
X2_SPLITS = [(4, 8, 1, 3), (2, 8, 1, 2), (1, 16, 2, 4)]
if ON_GPU:
    X2_SPLITS += [(2, 512, 4, 2), (4, 256, 4, 4), (2, 256, 4, 3)]
FMA_SPLITS = [gv.GemvConfig(block_n=4, block_k=16, num_warps=1, stages=1, split_k=3, chunk=8,
                            split_last=True),
              gv.GemvConfig(block_n=2, block_k=32, num_warps=1, stages=1, split_k=2,
                            split_last=True)]
if ON_GPU:
    FMA_SPLITS += [gv.GemvConfig(block_n=2, block_k=1024, num_warps=4, stages=1, split_k=4,
                                 chunk=8, split_last=True)]


def _data(m, n, k, bias, seed, dtype=BF16):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return w, x, b


def _rounded(s32: torch.Tensor, dtype) -> torch.Tensor:
    """float32 sums cast as the kernel's store casts them: round to nearest even on a GPU,
    truncated in Triton's interpreter (bf16)."""
    if ON_GPU or dtype != BF16:
        return s32.to(dtype)
    return (s32.view(torch.int32) & ~0xFFFF).view(torch.float32).to(dtype)


def _planes(monkeypatch, module, fn):
    """The float32 planes ``fn`` (the plane path) hands to ``_split_sum`` (None where K is too
    short to split), and its output."""
    seen = []
    real = module._split_sum

    def keep(out, dtype):
        seen.append(out.clone())
        return real(out, dtype)

    monkeypatch.setattr(module, "_split_sum", keep)
    out = fn()
    monkeypatch.setattr(module, "_split_sum", real)
    assert len(seen) == 1
    return (seen[0] if seen[0].dim() == 3 else None), out


def _expected(planes, old, dtype):
    """The planes added in order 0, 1, ... and rounded once (no planes: the plain launch)."""
    if planes is None:
        return old
    return _rounded(functools.reduce(torch.add, list(planes)), dtype)


def _close(out, ref, tol=8e-3):
    rel = ((out.double() - ref).norm() / ref.norm()).item()
    assert rel < tol, rel


def _counters_zero():
    assert all(int(c.abs().sum()) == 0 for c in split_last._COUNTERS.values())


@pytest.mark.parametrize("config", X2_SPLITS, ids=str)
@pytest.mark.parametrize("shape", SHAPES)
def test_x2_split_last_adds_the_planes_in_order(monkeypatch, shape, config):
    """``gemv_fp8_x2`` with a 4-tuple: bitwise the plane path's planes added in order, the
    same bits on a second call, the counters back at zero; near the float64 product."""
    n, k = shape
    for bias in (False, True):
        w, x, b = _data(1, n, k, bias, hash((n, k, config, bias)) % 1000)
        seg = quantize_fp8(w).to(DEV)
        planes, old = _planes(monkeypatch, gemv_x2, lambda: gemv_x2.gemv_fp8_x2(
            x, seg.qweight, seg.scales, b, config=config[:3], split_k=config[3],
            split_last=False))
        with graph_scope():  # PDL on sm90+
            new = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=config)
        again = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=config)
        assert torch.equal(new, _expected(planes, old, BF16))
        assert torch.equal(again, new)
        _counters_zero()
        ref = x.double() @ seg.dequantize().double().t()
        if b is not None:
            ref = ref + b.double()
        _close(new, ref)
        ulp = old.float().abs().clamp_min(1e-30) * 2.0 ** -7  # the planes' sum order only
        assert ((new.float() - old.float()).abs() <= ulp + 1e-6).all()


# (config index, rows, dtype): each config meets 1-4 rows and both 16-bit dtypes
FMA_CASES = [(0, 1, BF16), (0, 3, F16), (1, 2, BF16), (1, 4, F16)]
if ON_GPU:
    FMA_CASES += [(2, 1, BF16), (2, 4, BF16), (2, 1, F16)]


@pytest.mark.parametrize("case", FMA_CASES, ids=str)
@pytest.mark.parametrize("shape", SHAPES[:1] + SHAPES[2:])
def test_fma_split_last_adds_the_planes_in_order(monkeypatch, shape, case):
    """``gemv`` (16-bit weights, 1-4 rows) and, at one row, ``gemv_fp8`` through the FMA
    kernel with ``split_last``: bitwise the planes added in order, twice; near the float64
    product."""
    n, k = shape
    i, m, dtype = case
    cfg = FMA_SPLITS[i]
    w, x, b = _data(m, n, k, (m + i) % 2 == 0, 100 * i + m, dtype)
    wq = w.to(DEV, dtype)
    plane_cfg = dataclasses.replace(cfg, split_last=False)
    planes, old = _planes(monkeypatch, gv, lambda: gv.gemv(x, wq, b, config=plane_cfg))
    with graph_scope():
        new = gv.gemv(x, wq, b, config=cfg)
    assert torch.equal(new, _expected(planes, old, dtype))
    assert torch.equal(gv.gemv(x, wq, b, config=cfg), new)
    ref = x.double() @ wq.double().t() + (b.double() if b is not None else 0)
    _close(new, ref)
    if m == 1 and dtype == BF16:  # e4m3 weights through the same kernel
        seg = quantize_fp8(w).to(DEV)
        planes, old = _planes(monkeypatch, gv, lambda: gv.gemv_fp8(
            x, seg.qweight, seg.scales, config=plane_cfg))
        new = gv.gemv_fp8(x, seg.qweight, seg.scales, config=cfg)
        assert torch.equal(new, _expected(planes, old, BF16))
    _counters_zero()


def test_flag_takes_the_split_tables_and_the_rules_splits(monkeypatch):
    """Off (the default), the launches are those of before: ``X2_TABLE`` / the rules, plane
    splits. On: ``SPLIT_TABLE`` / ``BF16_SPLIT_TABLE`` for their shapes (other shapes keep the
    rules), and a rule's split is combined in the launch (no ``_split_sum`` of planes)."""
    monkeypatch.delenv("TESSELLM_GEMV_SPLIT_LAST", raising=False)
    assert envs.gemv_split_last() is False
    monkeypatch.setenv("TESSELLM_GEMV_SPLIT_LAST", "1")
    assert envs.gemv_split_last() is True
    monkeypatch.setattr(gemv_x2_table, "SPLIT_TABLE", {(19, 100): (2, 8, 1, 2)})
    monkeypatch.setattr(gemv_x2, "SPLIT_TABLE", gemv_x2_table.SPLIT_TABLE)
    monkeypatch.setitem(gv.BF16_SPLIT_TABLE, (19, 100), (2, 32, 1, 2))
    monkeypatch.setattr(split_last, "ENABLED", False)
    assert gemv_x2.gemv_x2_config(19, 100) == (4, 256, 4)
    assert gv.gemv_config(1, 19, 100, False).split_last is False
    monkeypatch.setattr(split_last, "ENABLED", True)
    assert gemv_x2.gemv_x2_config(19, 100) == (2, 8, 1, 2)
    assert gemv_x2.gemv_x2_config(19, 104) == (4, 256, 4)
    cfg = gv.gemv_config(1, 19, 100, False)
    assert (cfg.block_n, cfg.block_k, cfg.split_k, cfg.split_last) == (2, 32, 2, True)
    assert not gv.gemv_config(1, 19, 100, True).split_last  # e4m3 keeps its tiles
    assert not gv.gemv_config(2, 19, 100, False).split_last  # one row only

    sums = []
    monkeypatch.setattr(gemv_x2, "_split_sum", lambda out, dt: sums.append(out) or
                        out.sum(0).to(dt) if out.dim() == 3 else out)
    monkeypatch.setattr(gv, "_split_sum", gemv_x2._split_sum)
    w, x, _ = _data(1, 19, 100, False, 3)
    seg = quantize_fp8(w).to(DEV)
    gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=(4, 8, 1), split_k=3)
    gv.gemv(x, w.to(DEV, BF16), config=gv.GemvConfig(2, 32, 1, 1, split_k=2))
    assert sums == []  # combined in the launch
    monkeypatch.setattr(split_last, "ENABLED", False)
    gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=(4, 8, 1), split_k=3)
    gv.gemv(x, w.to(DEV, BF16), config=gv.GemvConfig(2, 32, 1, 1, split_k=2))
    assert len(sums) == 2  # planes, summed after


@pytest.mark.parametrize("entry", [("e4m3", nk) for nk in sorted(gemv_x2_table.SPLIT_TABLE)]
                         + [("bf16", nk) for nk in sorted(gemv_x2_table.BF16_SPLIT_TABLE)]
                         or [None], ids=str)
def test_split_table_entries(monkeypatch, entry):
    """Each launch of ``SPLIT_TABLE`` / ``BF16_SPLIT_TABLE`` on its own weight shape under the
    flag (on the CPU, in the interpreter, on a small one, same launch), against the float64
    product; the same bits twice."""
    if entry is None:
        pytest.skip("the split tables are empty")
    kind, shape = entry
    monkeypatch.setattr(split_last, "ENABLED", True)
    n, k = shape if ON_GPU else (19, 100)
    w, x, _ = _data(1, n, k, False, 17)
    if kind == "e4m3":
        cfg = gemv_x2_table.SPLIT_TABLE[shape]
        seg = quantize_fp8(w).to(DEV)
        out = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=cfg)
        again = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=cfg)
        ref = x.double() @ seg.dequantize().double().t()
    else:
        bn, bk, warps, split = gemv_x2_table.BF16_SPLIT_TABLE[shape]
        cfg = gv.GemvConfig(bn, bk, warps, 1, split_k=split, chunk=8, split_last=True)
        if ON_GPU:
            assert gv.gemv_config(1, n, k, False) == cfg
        wb = w.to(DEV, BF16)
        out, again = gv.gemv(x, wb, config=cfg), gv.gemv(x, wb, config=cfg)
        ref = x.double() @ wb.double().t()
    assert torch.equal(out, again)
    _close(out, ref)


def test_prewait_table_sets_the_tiles_of_its_shape(monkeypatch):
    """``PREWAIT_TILES`` under the flag: its shape's launches read that many tiles before the
    PDL wait (at most a program's K steps), other shapes and the flag off keep
    TESSELLM_GEMV_PREWAIT's; the output is bitwise the same either way."""
    n, k = 19, 100
    monkeypatch.setattr(gv, "PREWAIT", gv.Prewait(1))
    monkeypatch.setitem(gemv_x2.PREWAIT_TILES, (n, k), 2)
    x = torch.zeros(1, k, device=DEV, dtype=BF16)
    monkeypatch.setattr(split_last, "ENABLED", False)
    assert gemv_x2._prewait(x, n, k, 3)["PRE_TILES"] == 1
    w, x, b = _data(1, n, k, True, 23)
    seg = quantize_fp8(w).to(DEV)
    want = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=(2, 8, 1))
    monkeypatch.setattr(split_last, "ENABLED", True)
    assert gemv_x2._prewait(x, n, k, 3)["PRE_TILES"] == 2
    assert gemv_x2._prewait(x, n, k, 1)["PRE_TILES"] == 1
    assert gemv_x2._prewait(x, n + 1, k, 3)["PRE_TILES"] == 1
    with graph_scope():
        got = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=(2, 8, 1))
    assert torch.equal(got, want)


def test_folds_and_epilogues_keep_one_k_range(monkeypatch):
    """The SiLU fold and the add-RMSNorm epilogue need whole sums: under the flag, with a
    ``SPLIT_TABLE`` entry for their shape, they take its tiles and no split."""
    monkeypatch.setattr(split_last, "ENABLED", True)
    n, k = 19, 100
    monkeypatch.setitem(gemv_x2.SPLIT_TABLE, (2 * n, k), (2, 8, 1, 3))
    w, x, _ = _data(1, 2 * n, k, False, 5)
    seg = quantize_fp8(w).to(DEV)
    out = gemv_x2.gemv_fp8_x2_silu_and_mul(x, seg.qweight, seg.scales)
    gu = x.double() @ seg.dequantize().double().t()
    _close(out, torch.nn.functional.silu(gu[:, :n]) * gu[:, n:], 2e-2)


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_split_last_in_a_cuda_graph(monkeypatch):
    """Captured with PDL and replayed twice: the counters reset within the graph, the output
    is the eager launch's, bitwise."""
    n, k = 4096, 4096
    w, x, _ = _data(1, n, k, False, 11)
    seg = quantize_fp8(w).to(DEV)
    wb = w.to(DEV, BF16)
    cfg8 = (2, 512, 4, 2)
    cfg16 = gv.GemvConfig(2, 1024, 4, 1, split_k=4, chunk=8, split_last=True)
    with graph_scope():
        want8 = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=cfg8)  # warm-up
        want16 = gv.gemv(x, wb, config=cfg16)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got8 = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=cfg8)
            got16 = gv.gemv(x, wb, config=cfg16)
    for _ in range(2):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(got8, want8) and torch.equal(got16, want16)
    _counters_zero()


_COMPILE = r"""
import json
from tessellm.kernels.gemm import gemv, gemv_x2
from tests.kernels.offline_compile import sm90_counts

bf, f32 = "*bf16", "*fp32"
ptrs = dict(out_ptr=f32, y_ptr=bf, split_ctr_ptr="*i32", res_ptr=bf, g_ptr=bf, normed_ptr=bf,
            counter_ptr="*i32")
pre = dict(PRE_TILES=1, PRE_L2=False, PRE_S=True, USE_PDL=True, NORM_EPI=False, NORM_BLOCK=1,
           SPLIT_LAST=2)
found = {
    "x2": sm90_counts(gemv_x2._gemv_e4m3_x2_kernel,
                      dict(x_ptr=bf, w_ptr="*fp8e4nv", s_ptr=f32, bias_ptr=f32, **ptrs),
                      dict(HAS_BIAS=False, EVEN_K=True, BLOCK_N=2, BLOCK_KW=512, PTX=True,
                           SILU_FOLD=False, **pre)),
    "fma": sm90_counts(gemv._gemv_fma_kernel,
                       dict(x_ptr=bf, w_ptr=bf, s_ptr=bf, bias_ptr=bf, **ptrs),
                       dict(W_FP8=False, W_PTX=False, HAS_BIAS=False, EVEN_K=True, BLOCK_M=1,
                            BLOCK_N=2, BLOCK_K=1024, STAGES=1, CHUNK=8, F32_BITS=False, PTX=True,
                            SILU_FOLD=False, **pre)),
}
print("RESULT" + json.dumps(found))
"""


def test_split_last_compiles_for_sm90():
    """Both kernels with SPLIT_LAST compiled for sm_90 (no GPU needed): a gpu-scope acq_rel
    atomic after a CTA barrier, the planes read back past L1, the PDL pair kept."""
    import json

    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = json.loads(proc.stdout.split("RESULT", 1)[1])
    for name, k in found.items():
        assert k["atom_acq_rel"] >= 1 and k["ld_cg"] >= 1 and k["bar"] >= 1, (name, k)
        assert k["pdl"] >= 2, (name, k)
