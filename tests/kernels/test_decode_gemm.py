"""The tile GEMM for decode-sized row counts (``gemm/decode_gemm.py``) and its SiLU-and-mul
epilogue, against a float64 oracle and against the two launches the epilogue replaces (the
plain kernel, then ``TritonOps.silu_and_mul``: bitwise), on the GPU at Llama-3.1-8B shapes and
in the interpreter at tiny ones; and ``TritonOps``' routing under ``TESSELLM_DECODE_GEMM``.

Row counts span several row tiles (the last one partly masked), K is not a multiple of the K
step, the up half of the stacked weight differs from its gate half, and on a GPU the allocator
is filled with NaN first, so a masked-out row, a wrong K tail, a swapped half or an output no
program writes each fail.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("triton")

from tessellm import envs  # noqa: E402
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.kernels.gemm import decode_gemm as dg  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
BF16, F16, F32 = torch.bfloat16, torch.float16, torch.float32
# (M, N, K): N the output columns (with SiLU: the weight has 2N rows)
SHAPES = ([(256, 4096, 4096), (3, 1031, 4096), (200, 1000, 300), (512, 2048, 1024)] if ON_GPU
          else [(3, 40, 80), (17, 24, 40), (33, 9, 56)])
CONFIGS = ({"default": None, "128x128": dg.DecodeGemmConfig(128, 128, 64, 8, 4),
            "64x64": dg.DecodeGemmConfig(64, 64, 64, 4, 3)} if ON_GPU else
           {"default": None, "32x16x32": dg.DecodeGemmConfig(32, 16, 32, 1, 1)})


def _data(m, n_rows, k, dtype, bias, seed=0):
    g = torch.Generator().manual_seed(seed + 7 * m + n_rows + k)
    x = torch.randn(m, k, generator=g).to(DEV, dtype)
    w = (torch.randn(n_rows, k, generator=g) * 0.1)
    w[n_rows // 2:] *= 3  # the up half differs from the gate half
    b = torch.randn(n_rows, generator=g).to(DEV, dtype) if bias else None
    if ON_GPU:
        torch.full(((n_rows + m) * k * 4 + (1 << 20),), float("nan"), device=DEV)
    return x, w.to(DEV, dtype), b


def _oracle(x, w, b):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


def _close(got, want, dtype, rel16=1e-2):
    assert torch.isfinite(got).all(), "an output element was never written"
    err = ((got.double() - want).norm() / want.norm()).item()
    assert err < (1e-5 if dtype == F32 else rel16), f"relative error {err:.2e}"


# (launch shape, dtype): every dtype at the default shape, bf16 at the others (a GPU compiles
# each pair: the list is kept short)
PLAIN = [(c, d) for c in CONFIGS for d in ((BF16, F16, F32) if c == "default" else (BF16,))]
SILU = [(c, d) for c in CONFIGS for d in ((BF16, F32) if c == "default" else (BF16,))]
_ids = {BF16: "bf16", F16: "f16", F32: "f32"}


@pytest.mark.parametrize("config,dtype", PLAIN, ids=[f"{c}-{_ids[d]}" for c, d in PLAIN])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_decode_gemm_matches_the_product(shape, bias, dtype, config):
    m, n, k = shape
    x, w, b = _data(m, n, k, dtype, bias)
    got = dg.decode_gemm(x, w, b, config=CONFIGS[config])
    assert got.shape == (m, n) and got.dtype == dtype
    _close(got, _oracle(x, w, b), dtype)


@pytest.mark.parametrize("config,dtype", SILU, ids=[f"{c}-{_ids[d]}" for c, d in SILU])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_silu_epilogue_is_the_two_launches_bitwise(shape, bias, dtype, config):
    m, n, k = shape
    x, w, b = _data(m, 2 * n, k, dtype, bias)
    got = dg.decode_gemm_silu_and_mul(x, w, b, config=CONFIGS[config])
    # the same launch shape for the plain kernel (its own default for 2n columns may differ)
    cfg = CONFIGS[config] or dg.decode_gemm_config(
        m, n, k, True, torch.cuda.get_device_properties(0).multi_processor_count if ON_GPU else 1,
        interpreted=not ON_GPU)
    assert got.shape == (m, n)
    # the plain kernel over the whole [2n, k] weight with the same tiles, then the activation
    # (the same K order per output column: same sums, same roundings)
    two = TritonOps().silu_and_mul(dg.decode_gemm(x, w, b, config=cfg))
    assert torch.equal(got, two)
    y = _oracle(x, w, b)
    _close(got, F.silu(y[:, :n]) * y[:, n:], dtype, rel16=3e-2)  # three bf16 roundings


def test_bad_input_is_a_clear_error():
    x = torch.randn(4, 16, device=DEV)
    with pytest.raises(TypeError, match="cast one of them"):
        dg.decode_gemm(x, torch.randn(8, 16, device=DEV, dtype=F16))
    with pytest.raises(ValueError, match=r"row-major \[N, 16\]"):
        dg.decode_gemm(x, torch.randn(8, 12, device=DEV))
    with pytest.raises(ValueError, match="even row count"):
        dg.decode_gemm_silu_and_mul(x, torch.randn(7, 16, device=DEV))
    assert dg.decode_gemm(x[:0], torch.randn(8, 16, device=DEV)).shape == (0, 8)


def test_default_launch_shapes_fill_the_sms():
    """Llama-3.1-8B's o projection at 256 rows on 132 SMs: 64-column tiles (128 programs, not
    64); gate_up's dual kernel keeps 64 columns; small row counts take 64-row tiles."""
    o = dg.decode_gemm_config(256, 4096, 4096, False, 132)
    assert (o.block_m, o.block_n) == (128, 64) and o.tiles(256, 4096) == 128
    big = dg.decode_gemm_config(256, 28672, 4096, False, 132)
    assert big.block_n == 128
    assert dg.decode_gemm_config(256, 14336, 4096, True, 132).block_n == 64
    assert dg.decode_gemm_config(48, 4096, 4096, False, 132).block_m == 64


@pytest.mark.parametrize("value,want", [("", (False, False, 512)), ("0", (False, False, 512)),
                                        ("1", (True, True, 512)), ("all", (True, True, 512)),
                                        ("linear", (True, False, 512)),
                                        ("silu", (False, True, 512))])
def test_env_setting(monkeypatch, value, want):
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", value)
    monkeypatch.delenv("TESSELLM_DECODE_GEMM_MAX_ROWS", raising=False)
    assert envs.decode_gemm() == want


def test_env_errors(monkeypatch):
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", "yes please")
    with pytest.raises(ValueError, match="TESSELLM_DECODE_GEMM='yes please'"):
        envs.decode_gemm()
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", "1")
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_MAX_ROWS", "2")
    with pytest.raises(ValueError, match="3 or more"):
        envs.decode_gemm()
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_MAX_ROWS", "64")
    assert envs.decode_gemm() == (True, True, 64)


def _counting(monkeypatch):
    calls = []
    plain, dual = dg.decode_gemm, dg.decode_gemm_silu_and_mul
    import tessellm.kernels.fused_ops as fo

    monkeypatch.setattr(fo, "decode_gemm", lambda *a: calls.append("plain") or plain(*a))
    monkeypatch.setattr(fo, "decode_gemm_silu_and_mul",
                        lambda *a: calls.append("silu") or dual(*a))
    return calls


@pytest.mark.parametrize("value", ["0", "1", "linear", "silu"])
def test_triton_ops_routing(monkeypatch, value):
    """``TritonOps.linear`` / ``linear_silu_and_mul`` take the tile GEMM only where the setting
    says, at 3 to the row limit, and never for more outputs than ``decode_gemm_max_n``; the
    results equal the kernel's own (and, off, torch's product)."""
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", value)
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_MAX_ROWS", "8")
    calls = _counting(monkeypatch)
    ops = TritonOps()
    plain_on, silu_on, _ = envs.decode_gemm()
    x, w, b = _data(5, 24, 32, F32, True)
    y = ops.linear(x, w, b)
    assert calls == (["plain"] if plain_on else [])
    want = dg.decode_gemm(x, w, b) if plain_on else F.linear(x, w, b)
    assert torch.equal(y, want)
    calls.clear()
    act = ops.linear_silu_and_mul(x, w, b)
    assert calls == (["silu"] if silu_on else ["plain"] if plain_on else [])
    assert ops.decode_gemm_rows() == (8 if silu_on else 2)
    if silu_on:
        assert torch.equal(act, dg.decode_gemm_silu_and_mul(x, w, b))
    calls.clear()
    ops.linear(_data(9, 24, 32, F32, False)[0], w)  # over the row limit
    ops.linear(x[:2], w)  # 1-2 rows: not this kernel (fp32: torch's)
    ops.decode_gemm_max_n = 16
    ops.linear(x, w)  # more outputs than decode_gemm_max_n (the LM head's case)
    assert calls == []


def test_max_n_variable(monkeypatch):
    """TESSELLM_DECODE_GEMM_MAX_N bounds the plain products' outputs (the SiLU product is not
    bounded by it); a malformed value is one clear error."""
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", "1")
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_MAX_N", "16")
    calls = _counting(monkeypatch)
    ops = TritonOps()
    x, w, _ = _data(5, 24, 32, F32, False)
    ops.linear(x, w)
    ops.linear(x, w[:16])
    ops.linear_silu_and_mul(x, w)
    assert calls == ["plain", "silu"] and ops.decode_gemm_max_n == 16
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_MAX_N", "lots")
    with pytest.raises(ValueError, match="TESSELLM_DECODE_GEMM_MAX_N='lots'"):
        envs.decode_gemm_max_n()


def test_silu_tiles_override(monkeypatch):
    """TESSELLM_DECODE_GEMM_SILU_TILES sets the dual kernel's launch shape (same result as the
    kernel called with that shape); a malformed value is one clear error."""
    monkeypatch.setenv("TESSELLM_DECODE_GEMM", "silu")
    monkeypatch.setenv("TESSELLM_DECODE_GEMM_SILU_TILES", "32x16x32x1x2")
    assert envs.decode_gemm_silu_tiles() == (32, 16, 32, 1, 2)
    seen = []
    dual = dg.decode_gemm_silu_and_mul
    import tessellm.kernels.fused_ops as fo

    monkeypatch.setattr(fo, "decode_gemm_silu_and_mul",
                        lambda x, w, b, cfg: seen.append(cfg) or dual(x, w, b, cfg))
    x, w, b = _data(5, 48, 64, F32, True)
    got = TritonOps().linear_silu_and_mul(x, w, b)
    assert seen == [dg.DecodeGemmConfig(32, 16, 32, 1, 2)]
    assert torch.equal(got, dual(x, w, b, config=dg.DecodeGemmConfig(32, 16, 32, 1, 2)))
    for bad in ("128x64x64x4", "128x48x64x4x4", "axbxcxdxe"):
        monkeypatch.setenv("TESSELLM_DECODE_GEMM_SILU_TILES", bad)
        with pytest.raises(ValueError, match="BLOCK_MxBLOCK_NxBLOCK_KxWARPSxSTAGES"):
            envs.decode_gemm_silu_tiles()


_COMPILE = r"""
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tessellm.kernels.gemm import decode_gemm as dg

def compile_sm90(consts, num_warps, num_stages):
    fn = dg._decode_gemm_kernel
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name], attrs[(i,)] = "*bf16", [["tt.divisibility", 16]]
        else:
            sig[name], attrs[(i,)] = "i32", [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return dict(wgmma=k.asm["ttgir"].count("warp_group_dot"), shared=k.metadata.shared,
                gdc=k.asm["ptx"].count("griddepcontrol"))

out = {}
for silu in (False, True):
    cfg = dg.decode_gemm_config(256, 14336 if silu else 4096, 4096, silu, 132)
    out[str(silu)] = compile_sm90(dict(BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
                                       BLOCK_K=cfg.block_k, EVEN_K=True, HAS_BIAS=False,
                                       SILU=silu, DOT_FP32=False, DOT_PREC="tf32", USE_PDL=True),
                                  cfg.num_warps, cfg.num_stages)
print("RESULT" + json.dumps(out))
"""


def test_default_launch_shapes_compile_to_hopper_mma():
    """The 256-row default launch shapes (plain and SiLU) compiled for sm_90: the dots become
    warp-group MMAs (wgmma, not the older mma or FMA loops), shared memory fits an H100/H200
    SM (228 KB), and the PDL wait and trigger are in the PTX."""
    from tests.kernels.offline_compile import run_compile_script

    proc = run_compile_script(_COMPILE)
    assert proc.returncode == 0 and "RESULT" in proc.stdout, proc.stderr[-3000:]
    found = __import__("json").loads(proc.stdout.split("RESULT", 1)[1])
    for silu, k in found.items():
        assert k["wgmma"] >= (2 if silu == "True" else 1), (silu, k)
        assert 0 < k["shared"] <= 228 * 1024, (silu, k)
        assert k["gdc"] >= 2, (silu, k)
