"""Triton fused ops against the pure-torch reference ops (``backends/reference/ops.py``).

On a GPU the caching allocator is first filled with NaN so that an output element the kernel
forgets to write shows up as NaN; in-place outputs are checked element by element.
"""

from __future__ import annotations

import zlib

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.backends.reference.ops import ReferenceOps  # noqa: E402
from tessellm.backends.spec import FusedOps  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16
DTYPES = [F32, BF16, F16]
HIDDEN = [4096, 5120] if ON_GPU else [256, 200]  # 200: not a power of two
ROWS = 67 if ON_GPU else 5
REF = ReferenceOps()
OPS = TritonOps()


def _gen(*parts) -> torch.Generator:
    return torch.Generator().manual_seed(zlib.crc32(repr(parts).encode()))


def _randn(*shape, gen, dtype, scale=1.0) -> torch.Tensor:
    return (scale * torch.randn(*shape, generator=gen)).to(dtype).to(DEVICE)


def _poison_allocator(numel: int) -> None:
    """Leave NaN in freed GPU memory, so ``torch.empty`` in the op hands back NaN."""
    if ON_GPU:
        torch.full((numel * 4,), float("nan"), device=DEVICE)


def _check(out, ref, dtype) -> None:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "some output elements were never written"
    tol = {F32: 1e-5, F16: 2e-3, BF16: 1.6e-2}[dtype]
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)


def test_triton_ops_is_fused_ops():
    assert isinstance(OPS, FusedOps)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype, hidden):
    gen = _gen("rms", dtype, hidden)
    x = _randn(ROWS, hidden, gen=gen, dtype=dtype, scale=3.0)
    w = _randn(hidden, gen=gen, dtype=dtype).add_(1.0)
    _poison_allocator(x.numel())
    _check(OPS.rms_norm(x, w, 1e-6), REF.rms_norm(x, w, 1e-6), dtype)


def test_rms_norm_keeps_leading_dims_and_promotes_like_torch():
    gen = _gen("rms-3d")
    x = _randn(2, 3, 64, gen=gen, dtype=BF16)
    w = _randn(64, gen=gen, dtype=F32)  # fp32 weight: the reference's product is fp32
    _check(OPS.rms_norm(x, w, 1e-5), REF.rms_norm(x, w, 1e-5), BF16)


@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(dtype, hidden):
    gen = _gen("add-rms", dtype, hidden)
    x = _randn(ROWS, hidden, gen=gen, dtype=dtype)
    residual = _randn(ROWS, hidden, gen=gen, dtype=dtype, scale=2.0)
    w = _randn(hidden, gen=gen, dtype=dtype)
    ref_out, ref_res = REF.fused_add_rms_norm(x.clone(), residual.clone(), w, 1e-6)
    _poison_allocator(x.numel())
    out, new_res = OPS.fused_add_rms_norm(x, residual, w, 1e-6)
    _check(out, ref_out, dtype)
    _check(new_res, ref_res, dtype)
    assert torch.equal(new_res, residual), "residual is updated in place"


@pytest.mark.parametrize("head_size,num_heads,num_kv_heads,rotary_dim", [
    (64, 4, 2, 64), (128, 8, 1, 128), (80, 3, 3, 80),
    (64, 4, 2, 16), (80, 3, 1, 40), (128, 2, 2, 96)])  # partial rotary (Phi-2, GPT-NeoX, ...)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_embedding_neox_in_place(dtype, head_size, num_heads, num_kv_heads, rotary_dim):
    """Whole heads, and partial rotary: only the first rotary_dim dims of each head rotate (the
    rest must stay as they were; TritonOps refused it at the first forward before)."""
    gen = _gen("rope", dtype, head_size, num_heads)
    num_tokens, max_pos = (300, 4096) if ON_GPU else (7, 64)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin_cache = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    positions = torch.randint(0, max_pos, (num_tokens,), generator=gen).to(DEVICE)
    # q and k as strided views into one fused qkv projection, like the attention layer has them.
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = _randn(num_tokens, q_size + 2 * kv_size, gen=gen, dtype=dtype)
    q, k = qkv[:, :q_size], qkv[:, q_size:q_size + kv_size]
    v_before = qkv[:, q_size + kv_size:].clone()
    ref_q, ref_k = REF.rotary_embedding(positions, q.clone(), k.clone(), cos_sin_cache, head_size)
    out_q, out_k = OPS.rotary_embedding(positions, q, k, cos_sin_cache, head_size)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    _check(q, ref_q, dtype)
    _check(k, ref_k, dtype)
    assert torch.equal(qkv[:, q_size + kv_size:], v_before), "v must be left alone"


@pytest.mark.parametrize("d", [14336, 1000] if ON_GPU else [128, 100])
@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(dtype, d):
    gen = _gen("silu", dtype, d)
    x = _randn(3, ROWS, 2 * d, gen=gen, dtype=dtype, scale=3.0)
    _poison_allocator(x.numel())
    _check(OPS.silu_and_mul(x), REF.silu_and_mul(x), dtype)


@pytest.mark.parametrize("rows,n,k", [(1, 96, 80), (2, 96, 80), (2, 9000, 16), (3, 96, 80)])
def test_linear_gemv_at_decode_rows_else_torch(rows, n, k):
    """``TritonOps.linear``: the GEMV for 1 row (2 below ``gemv_two_rows_max_n`` outputs),
    bit-identical to ``F.linear`` where it falls back; bf16 close to a float32 product."""
    g = _gen("linear", rows, n, k)
    x = torch.randn(rows, k, generator=g).to(DEVICE, BF16)
    w = torch.randn(n, k, generator=g).to(DEVICE, BF16)
    bias = torch.randn(n, generator=g).to(DEVICE, BF16)
    y = OPS.linear(x, w, bias)
    ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
    assert y.dtype == BF16 and y.shape == (rows, n)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)
    uses_gemv = rows == 1 or (rows == 2 and n < OPS.gemv_two_rows_max_n)
    if not uses_gemv:
        assert torch.equal(y, torch.nn.functional.linear(x, w, bias))


def test_use_backend_linear_routes_dense_layers_only():
    """Dense linears and the LM head call the backend's ``linear``; quantized ones keep their
    method; a backend without ``linear`` changes nothing."""
    import torch.nn as nn

    from tessellm.layers.linear import Linear, RowParallelLinear, use_backend_linear
    from tessellm.layers.vocab import ParallelLMHead

    class Spy:
        def __init__(self):
            self.calls = 0

        def linear(self, x, weight, bias=None):
            self.calls += 1
            return torch.nn.functional.linear(x, weight, bias)

    class Quant:  # the parts of a quant method Linear touches
        def create_weights(self, layer, *args):
            layer.weight = nn.Parameter(torch.ones(4, 8), requires_grad=False)

        def apply(self, layer, x, bias=None):
            return x @ layer.weight.T

    model = nn.ModuleList([Linear(8, [4, 4]), RowParallelLinear(8, 4), ParallelLMHead(10, 8),
                           Linear(8, [4], quant_method=Quant())])
    for p in model.parameters():
        p.data.normal_()
    assert use_backend_linear(model, object()) == 0
    spy = Spy()
    assert use_backend_linear(model, spy) == 3
    x = torch.randn(2, 8)
    for module in model:
        module(x)
    assert spy.calls == 3


@pytest.mark.parametrize("env", [None, "1", "0"])
def test_pdl_only_inside_a_graph_scope_on_a_gpu(monkeypatch, env):
    """Kernels get the PDL launch flag only inside the graph runner's scope, on sm90+, unless
    TESSELLM_PDL=0; everywhere else (the cpu interpreter included) they launch plainly."""
    from tessellm import envs
    from tessellm.kernels import pdl

    if env is None:
        monkeypatch.delenv("TESSELLM_PDL", raising=False)
    else:
        monkeypatch.setenv("TESSELLM_PDL", env)
    pdl._enabled.cache_clear()
    assert envs.cuda_pdl() == (env != "0")  # on unless turned off
    try:
        assert pdl.pdl_args(DEVICE) == {"USE_PDL": False}  # outside the scope
        with pdl.graph_scope():
            inside = pdl.pdl_args(DEVICE)
            assert pdl.pdl_args(torch.device("cpu")) == {"USE_PDL": False}
        assert pdl.pdl_args(DEVICE) == {"USE_PDL": False}
        hopper = ON_GPU and torch.version.hip is None and torch.cuda.get_device_capability()[0] >= 9
        on = hopper and env != "0"
        assert inside == ({"USE_PDL": True, "launch_pdl": True} if on else {"USE_PDL": False})
    finally:
        pdl._enabled.cache_clear()
