"""The skinny GEMMs (``tessellm/kernels/gemm/``) against dequantize-then-matmul in float32.

Random data, odd N and K that no tile divides, M = 1..16, with and without bias, each way to
multiply (FMA, tensor-core dot) with and without split-K. On a GPU the caching allocator is
first filled with NaN, so an output element the kernel never writes shows up; on the CPU the
kernels run in Triton's interpreter at tiny sizes.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.gemm import gemv as gv  # noqa: E402
from tessellm.kernels.gemm import gemv_x2, w8a8  # noqa: E402
from tessellm.quantization.packed import quantize_fp8, quantize_fp8_per_token  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
# Each (config, dtype, M's tile, bias, K parity) is a Triton compile on a GPU: there the M loop
# runs in bf16 and test_gemv_other_dtypes takes fp16/fp32 through fewer M.
DTYPES = [BF16] if ON_GPU else [BF16, F16, F32]
TOL = {F32: 1e-5, F16: 2e-3, BF16: 8e-3}  # relative (Frobenius) error vs the fp32 reference
# (N, K): K = 100 and 300 leave a partial K step (masked), 64 and 4096 do not for most tiles
SHAPES = [(1031, 300), (2056, 4096)] if ON_GPU else [(19, 100), (13, 64)]
CONFIGS = {  # None: the tuned table's choice for the shape
    "table": None,
    "fma": gv.GemvConfig(block_n=4, block_k=64, num_warps=1, stages=1),
    "fma-split3": gv.GemvConfig(block_n=8, block_k=16, num_warps=1, stages=1, split_k=3),
    "fma-chunk-bits": gv.GemvConfig(block_n=4, block_k=64, num_warps=2, stages=1, chunk=16,
                                    f32_bits=True),  # bits: e4m3 on a GPU only
    "dot": gv.GemvConfig(block_n=16, block_k=32, num_warps=4, stages=2, dot=True),
    "dot-split2": gv.GemvConfig(block_n=16, block_k=16, num_warps=4, stages=1, split_k=2,
                                dot=True),
}


def _rows(dtype, config) -> range:
    """M = 1..16 on a GPU; in the interpreter every fourth M, a different quarter for each
    config of a dtype, so that every M still meets every dtype."""
    if ON_GPU:
        return range(1, 17)
    return range(1 + (DTYPES.index(dtype) + list(CONFIGS).index(config)) % 4, 17, 4)


def _bias(config, m) -> bool:
    """Half the configs add a bias for odd M, the others for even M."""
    return (list(CONFIGS).index(config) + m) % 2 == 1


def _fma_only(config) -> bool:
    """The FMA kernel takes at most 4 rows."""
    return CONFIGS[config] is not None and not CONFIGS[config].dot


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _poison_allocator(numel: int) -> None:
    """Leave NaN in freed GPU memory, so ``torch.empty`` in the kernel's launcher hands back
    NaN where the kernel does not write."""
    if ON_GPU:
        torch.full((numel * 4 + (1 << 20),), float("nan"), device=DEV)


def _data(m, n, k, dtype, bias, *seed):
    g = _gen(m, n, k, dtype, bias, *seed)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    b = torch.randn(n, generator=g).to(DEV, dtype) if bias else None
    return w, x, b


def _check(out, x, w_f32, bias, dtype):
    ref = x.float() @ w_f32.to(DEV).t()
    if bias is not None:
        ref = ref + bias.float()
    assert out.shape == ref.shape and out.dtype == dtype, (out.shape, out.dtype)
    assert torch.isfinite(out).all(), "some output elements are NaN: never written?"
    err = out.float() - ref
    rel = (err.norm() / ref.norm()).item()
    assert rel < TOL[dtype], f"relative error {rel:.2e}"
    worst = (err.abs().max() / ref.abs().max()).item()  # catches a stray unwritten element
    assert worst < 8 * TOL[dtype], f"largest error {worst:.2e} of max |ref|"


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_16bit(shape, dtype, config):
    n, k = shape
    for m in _rows(dtype, config):
        if _fma_only(config) and m > 4:
            continue
        w, x, b = _data(m, n, k, dtype, _bias(config, m))
        wq = w.to(DEV, dtype)
        _poison_allocator(m * n)
        _check(gv.gemv(x, wq, b, CONFIGS[config]), x, wq.float(), b, dtype)


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_fp8(shape, dtype, config):
    n, k = shape
    for m in _rows(dtype, config):
        if _fma_only(config) and m > 4:
            continue
        w, x, b = _data(m, n, k, dtype, not _bias(config, m), "fp8")
        seg = quantize_fp8(w).to(DEV)
        _poison_allocator(m * n)
        out = gv.gemv_fp8(x, seg.qweight, seg.scales, b, CONFIGS[config])
        _check(out, x, seg.dequantize(), b, dtype)


@pytest.mark.skipif(not ON_GPU, reason="the interpreter runs every dtype in the tests above")
@pytest.mark.parametrize("config", ["table", "fma", "fma-chunk-bits", "dot"])
@pytest.mark.parametrize("dtype", [F16, F32])
def test_gemv_other_dtypes(dtype, config):
    n, k = SHAPES[0]
    for m in (1, 3, 16):
        if _fma_only(config) and m > 4:
            continue
        w, x, b = _data(m, n, k, dtype, m == 3, "other")
        wq = w.to(DEV, dtype)
        _check(gv.gemv(x, wq, b, CONFIGS[config]), x, wq.float(), b, dtype)
        seg = quantize_fp8(w).to(DEV)
        out = gv.gemv_fp8(x, seg.qweight, seg.scales, b, CONFIGS[config])
        _check(out, x, seg.dequantize(), b, dtype)


@pytest.mark.parametrize("config", ["table", "fma", "fma-chunk-bits", "dot"])
@pytest.mark.parametrize("dtype", [BF16, F16])
def test_gemv_fp8_widens_every_code_exactly(dtype, config):
    """Every finite e4m3 code (subnormals, +-0, +-448) times a one-hot x comes back unchanged:
    on a GPU this checks the bit-moving conversion (``e4m3_to_16bit``), code by code."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]  # 254 finite codes
    qweight = codes.view(2, 127).repeat(8, 1).to(DEV)  # [16, 127]: every code, odd K
    for m in (1, 4) if _fma_only(config) else (1, 16):
        x = torch.eye(127, dtype=dtype, device=DEV)[m * 7:m * 8]  # row i picks column 7m + i
        out = gv.gemv_fp8(x, qweight, torch.ones(16, device=DEV), config=CONFIGS[config])
        expect = qweight.float()[:, m * 7:m * 8].t()
        assert torch.equal(out.float(), expect), (out.float() - expect).abs().max()


@pytest.mark.skipif(ON_GPU, reason="e4m3fnuz is the rocm backend's format (MI300); NVIDIA "
                                   "Triton has no such type, the interpreter does")
@pytest.mark.parametrize("config", ["table", "fma", "dot"])
def test_gemv_fp8_e4m3fnuz(config):
    """The rocm backend's fp8 layers reach gemv_fp8 through weight_only.fp8_w8a16."""
    n, k = SHAPES[0]
    for m in (1, 3):
        w, x, b = _data(m, n, k, BF16, True, "fnuz")
        seg = quantize_fp8(w, torch.float8_e4m3fnuz)
        out = gv.gemv_fp8(x, seg.qweight, seg.scales, b, CONFIGS[config])
        _check(out, x, seg.dequantize(), b, BF16)


W8A8_CONFIGS = {"table": None,
                "split3": gv.GemvConfig(block_n=16, block_k=32, num_warps=4, stages=2, split_k=3,
                                        dot=True)}


@pytest.mark.parametrize("config", list(W8A8_CONFIGS))
@pytest.mark.parametrize("dtype", [BF16] if ON_GPU else [BF16, F32])
@pytest.mark.parametrize("shape", SHAPES)
def test_gemv_w8a8(shape, dtype, config):
    """W8A8 skinny GEMM against the prefill path's arithmetic: x quantized per row to e4m3
    (``quantize_fp8_per_token``), an exact product of the codes, both scales, bias. Quantized
    inside the kernel and passed in already quantized."""
    n, k = shape
    for m in (1, 2, 5, 16) if ON_GPU else (1, 3, 16):
        w, x, b = _data(m, n, k, dtype, m % 2 == 1, "w8a8")
        seg = quantize_fp8(w).to(DEV)
        xq, sx = quantize_fp8_per_token(x)
        x_fp8 = xq.float() * sx[:, None]
        _poison_allocator(m * n)
        out = w8a8.gemv_w8a8(x, seg.qweight, seg.scales, b, config=W8A8_CONFIGS[config])
        _check(out, x_fp8, seg.dequantize(), b, dtype)
        out = w8a8.gemv_w8a8(xq, seg.qweight, seg.scales, b, x_scales=sx,
                           config=W8A8_CONFIGS[config])
        _check(out, x_fp8.to(BF16), seg.dequantize(), b, BF16)


def test_gemv_w8a8_rounds_x_like_torch():
    """In-kernel quantization of x picks torch's e4m3 codes (round to nearest, ties to even;
    values that round up across a power of two included: the interpreter's own cast drops
    that carry, ``_round_e4m3`` stands in for it there). x is one row: e4m3 midpoints (ties),
    values just off them and codes, scale 1 (max |x| = 448); the weight is the identity."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()  # 0 .. 448
    mids = (grid[1:] + grid[:-1]) / 2
    vals = torch.cat([mids, mids * 0.999, mids * 1.001, grid, -mids])  # ties, near ties, codes
    x = torch.cat([vals, torch.tensor([448.0])])[None, :]  # max |x| = 448: scale exactly 1
    k = x.shape[1]
    qweight = torch.eye(k, dtype=torch.float32).to(torch.float8_e4m3fn).to(DEV)
    out = w8a8.gemv_w8a8(x.to(DEV), qweight, torch.ones(k, device=DEV))
    expect = x[0].to(torch.float8_e4m3fn).float()
    assert torch.equal(out.float().cpu()[0], expect), (out.float().cpu()[0] - expect).abs().max()


def test_configs_are_deterministic_and_cover_decode():
    """The table answers every (M, shape) of a Llama-8B layer the same way twice, with tiles
    the kernel can run; more rows than it covers fail loudly."""
    shapes = [(6144, 4096), (4096, 4096), (28672, 4096), (4096, 14336), (128256, 4096),
              (3072, 4096), (4096, 2048), (14336, 4096), (4096, 7168)]
    for fp8 in (False, True):
        for m in range(1, gv.GEMV_MAX_M + 1):
            for n, k in shapes:
                cfg = gv.gemv_config(m, n, k, fp8)
                assert cfg == gv.gemv_config(m, n, k, fp8)
                assert cfg.block_k & (cfg.block_k - 1) == 0 and cfg.split_k >= 1
                assert not cfg.dot or cfg.block_n >= 16
    with pytest.raises(ValueError, match="at most"):
        gv.gemv_config(gv.GEMV_MAX_M + 1, 64, 64, False)


def test_rejects_what_it_cannot_run():
    x = torch.randn(2, 32, device=DEV)
    with pytest.raises(ValueError, match="at most 4 rows"):
        gv.gemv(torch.randn(5, 32, device=DEV), torch.randn(8, 32, device=DEV),
                config=CONFIGS["fma"])
    with pytest.raises(TypeError, match="weight is"):
        gv.gemv(x, torch.randn(8, 32, device=DEV, dtype=BF16))
    with pytest.raises(ValueError, match="row-major"):
        gv.gemv(x, torch.randn(32, 8, device=DEV).t())
    assert gv.gemv(x[:0], torch.randn(8, 32, device=DEV)).shape == (0, 8)
    codes = torch.randn(8, 32, device=DEV).to(torch.float8_e4m3fn)
    ones = torch.ones(8, device=DEV)
    with pytest.raises(ValueError, match="at most 16 rows"):
        w8a8.gemv_w8a8(torch.randn(17, 32, device=DEV), codes, ones)
    with pytest.raises(TypeError, match="x_scales"):
        w8a8.gemv_w8a8(x, codes, ones, x_scales=torch.ones(2, device=DEV))


# gemv_fp8_x2: one bf16 row, e4m3 codes decoded in pairs to bf16x2 (inline PTX on a GPU; its
# float32 twin in the interpreter). (block_n, block_kw, warps, split_k): the table's tiles,
# a partial K step (masked) and split K.
X2_CONFIGS = [None, (2, 512, 4, None), (4, 16, 1, None), (8, 8, 1, 3), (1, 32, 2, 2)]
X2_SHAPES = [(1031, 300), (2056, 4096), (4096, 7168)] if ON_GPU else [(19, 100), (13, 64)]


@pytest.mark.parametrize("config", X2_CONFIGS)
@pytest.mark.parametrize("shape", X2_SHAPES)
def test_gemv_fp8_x2(shape, config):
    n, k = shape
    tiles, split = (config[:3], config[3]) if config else (None, None)
    for bias in (False, True):
        w, x, b = _data(1, n, k, BF16, bias, "x2")
        seg = quantize_fp8(w).to(DEV)
        _poison_allocator(n)
        out = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=tiles, split_k=split)
        _check(out, x, seg.dequantize(), b, BF16)


# The streamed kernel (5-tuples: block_n, block_kw, warps, programs per SM, prefetch): one
# program a tile with and without the register prefetch, persistent grids that loop over
# several tiles (in the interpreter 1 SM: 1-3 programs), partial K steps (K = 100, 300).
X2_STREAM = [(4, 16, 1, 0, False), (4, 16, 1, 0, True), (2, 8, 1, 3, True), (8, 32, 2, 2, False),
             (1, 64, 1, 1, True)]
if ON_GPU:
    X2_STREAM += [(4, 512, 4, 8, True), (8, 256, 4, 16, False), (16, 256, 8, 4, True)]


@pytest.mark.parametrize("config", X2_STREAM)
@pytest.mark.parametrize("shape", X2_SHAPES)
def test_gemv_fp8_x2_streamed(shape, config):
    """Against the float32 reference, and against the tiled x2 kernel: the same products
    (``_dot4_e4m3_bf16x2`` per word), so at most the float32 sum's order differs: within one
    bf16 rounding of the output."""
    n, k = shape
    for bias in (False, True):
        w, x, b = _data(1, n, k, BF16, bias, "x2s")
        seg = quantize_fp8(w).to(DEV)
        _poison_allocator(n)
        out = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=config)
        _check(out, x, seg.dequantize(), b, BF16)
        tiled = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, b, config=(2, 8, 1), split_k=1)
        ulp = tiled.float().abs().clamp_min(1e-30) * 2.0 ** -7
        assert ((out.float() - tiled.float()).abs() <= ulp + 1e-6).all()


def test_gemv_x2_table_picks_the_streamed_kernel(monkeypatch):
    """A shape in ``X2_TABLE`` takes its tuned launch (here a streamed one) through
    ``gemv_fp8_x2`` and the W8A16 entry point alike; other shapes keep the rules."""
    n, k = X2_SHAPES[0]
    w, x, _ = _data(1, n, k, BF16, False, "x2t")
    seg = quantize_fp8(w).to(DEV)
    cfg = (2, 8, 1, 3, True)
    monkeypatch.setitem(gemv_x2.X2_TABLE, (n, k), cfg)
    assert gemv_x2.gemv_x2_config(n, k) == cfg
    assert gemv_x2.gemv_x2_config(n + 1, k) != cfg
    want = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=cfg)
    assert torch.equal(gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales), want)


@pytest.mark.parametrize("shape", sorted(gemv_x2.X2_TABLE) or [None])
def test_gemv_x2_table_entries(shape):
    """Each measured launch shape of the table on its own weight shape (on the CPU, in the
    interpreter, on a small one), against the float32 reference."""
    if shape is None:
        pytest.skip("the table is empty")
    n, k = shape if ON_GPU else (19, 100)
    w, x, _ = _data(1, n, k, BF16, False, "x2tab")
    seg = quantize_fp8(w).to(DEV)
    _poison_allocator(n)
    out = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=gemv_x2.X2_TABLE[shape])
    _check(out, x, seg.dequantize(), None, BF16)


def test_gemv_fp8_x2_decodes_every_code_exactly():
    """Every finite e4m3 code times a one-hot x comes back unchanged (on a GPU: the byte
    permute, shift and mask of ``_dot4_e4m3_bf16x2``, code by code, and its bf16 lanes)."""
    codes = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn)
    codes = codes[~torch.isnan(codes.float())]  # 254 finite codes
    codes = torch.cat([codes, codes.new_zeros(2)])  # K = 128: whole words
    qweight = codes.view(2, 128).repeat(8, 1).to(DEV)  # [16, 128]
    for col in (0, 1, 2, 3, 61, 127):  # every position in a word
        x = torch.zeros(1, 128, dtype=BF16, device=DEV)
        x[0, col] = 1
        out = gemv_x2.gemv_fp8_x2(x, qweight, torch.ones(16, device=DEV), config=(2, 8, 1))
        expect = qweight.float()[:, col][None]
        assert torch.equal(out.float(), expect), (col, (out.float() - expect).abs().max())


def test_gemv_fp8_x2_refuses_what_it_cannot_run():
    seg = quantize_fp8(torch.randn(8, 64)).to(DEV)
    with pytest.raises(ValueError, match="one bf16 row"):
        gemv_x2.gemv_fp8_x2(torch.randn(2, 64, dtype=BF16, device=DEV), seg.qweight, seg.scales)
    with pytest.raises(ValueError, match="one bf16 row"):
        gemv_x2.gemv_fp8_x2(torch.randn(1, 64, dtype=F16, device=DEV), seg.qweight, seg.scales)
    seg = quantize_fp8(torch.randn(8, 66)).to(DEV)
    with pytest.raises(ValueError, match="multiples of 4"):
        gemv_x2.gemv_fp8_x2(torch.randn(1, 66, dtype=BF16, device=DEV), seg.qweight, seg.scales)


def test_gemv_fp8_x2_takes_an_unaligned_row():
    """x starting 2 bytes into a buffer (it is read as 64-bit words): copied, same result."""
    seg = quantize_fp8(torch.randn(8, 64)).to(DEV)
    buf = torch.randn(1, 65, dtype=BF16, device=DEV)
    x = buf.view(-1)[1:].view(1, 64)
    assert x.data_ptr() % 8
    want = gemv_x2.gemv_fp8_x2(x.clone(), seg.qweight, seg.scales, config=(2, 8, 1))
    assert torch.equal(gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales, config=(2, 8, 1)), want)


@pytest.mark.skipif(not ON_GPU or torch.version.hip is not None
                    or torch.cuda.get_device_capability()[0] < 9, reason="sm90+ NVIDIA only")
def test_fp8_w8a16_takes_the_x2_gemv_for_one_bf16_row(monkeypatch):
    """The W8A16 entry point sends one bf16 row to ``gemv_fp8_x2`` (same bits), and not when
    TESSELLM_FP8_GEMV_X2=0."""
    from tessellm.kernels.gemm import weight_only as qk

    seg = quantize_fp8(torch.randn(1031, 4096)).to(DEV)
    x = torch.randn(1, 4096, dtype=BF16, device=DEV)
    x2 = gemv_x2.gemv_fp8_x2(x, seg.qweight, seg.scales)
    assert torch.equal(qk.fp8_w8a16(x, seg.qweight, seg.scales), x2)
    monkeypatch.setenv("TESSELLM_FP8_GEMV_X2", "0")
    assert torch.equal(qk.fp8_w8a16(x, seg.qweight, seg.scales),
                       gv.gemv_fp8(x, seg.qweight, seg.scales))
