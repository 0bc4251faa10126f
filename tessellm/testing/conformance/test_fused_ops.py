"""The backend's fused ops (RMSNorm, residual-add RMSNorm, NeoX rotary, SiLU-and-mul, and the
optional ones: linear + SiLU, the gated RMSNorm, the fp8 activation fold) against the pure-torch
reference ops."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.gated_norm import GATED_NORM_MODES
from tessellm.backends.reference.ops import (ReferenceOps, linear_add_rms_norm,
                                             linear_add_rms_norm_fold, linear_rms_scaled,
                                             linear_silu_and_mul)
from tessellm.backends.spec import FusedOps, OpsSpec
from tessellm.testing.harness import tolerance

REF = ReferenceOps()


def _dtypes(target):
    return [torch.float32, target.low_precision_dtype]


def _ops(target, dtype):
    ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
    if ops is None:
        pytest.skip(f"{target.name} provides no fused ops (the reference ops are used)")
    assert isinstance(ops, FusedOps)
    return ops


def _rand(*shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g).to(dtype).to(device)


@pytest.mark.parametrize("rows,hidden", [(1, 64), (7, 96), (33, 256)])
def test_rms_norm(target, rows, hidden):
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        x = _rand(rows, hidden, dtype=dtype, device=target.device, seed=1)
        w = _rand(hidden, dtype=dtype, device=target.device, seed=2)
        x_before = x.clone()
        out = ops.rms_norm(x, w, 1e-6)
        assert torch.equal(x, x_before), "rms_norm must not modify its input"
        torch.testing.assert_close(out.cpu(), REF.rms_norm(x.cpu(), w.cpu(), 1e-6), **tolerance(dtype))


@pytest.mark.parametrize("rows,hidden", [(1, 64), (9, 128)])
def test_fused_add_rms_norm(target, rows, hidden):
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        x = _rand(rows, hidden, dtype=dtype, device=target.device, seed=3)
        r = _rand(rows, hidden, dtype=dtype, device=target.device, seed=4)
        w = _rand(hidden, dtype=dtype, device=target.device, seed=5)
        ref_out, ref_res = REF.fused_add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-5)
        out, res = ops.fused_add_rms_norm(x.clone(), r.clone(), w, 1e-5)
        torch.testing.assert_close(res.cpu(), ref_res, **tolerance(dtype))
        torch.testing.assert_close(out.cpu(), ref_out, **tolerance(dtype))


@pytest.mark.parametrize("tokens,heads,kv_heads,head_size,rotary_dim", [
    (1, 4, 2, 64, 64), (11, 8, 8, 32, 32), (5, 2, 1, 128, 128),
    (3, 4, 2, 64, 32), (5, 2, 1, 96, 72)])  # partial rotary: the dims past R stay unchanged
def test_rotary_embedding(target, tokens, heads, kv_heads, head_size, rotary_dim):
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        max_pos = 512
        inv = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
        freqs = torch.arange(max_pos).float()[:, None] * inv[None, :]
        cache = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(target.device)
        pos = torch.randint(0, max_pos, (tokens,), generator=torch.Generator().manual_seed(6))
        q = _rand(tokens, heads * head_size, dtype=dtype, device=target.device, seed=7)
        k = _rand(tokens, kv_heads * head_size, dtype=dtype, device=target.device, seed=8)
        ref_q, ref_k = REF.rotary_embedding(pos, q.cpu().clone(), k.cpu().clone(), cache.cpu(), head_size)
        out_q, out_k = ops.rotary_embedding(pos.to(target.device), q.clone(), k.clone(), cache, head_size)
        torch.testing.assert_close(out_q.cpu(), ref_q, **tolerance(dtype))
        torch.testing.assert_close(out_k.cpu(), ref_k, **tolerance(dtype))


@pytest.mark.parametrize("rows,d", [(1, 64), (13, 176)])
def test_silu_and_mul(target, rows, d):
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        x = _rand(rows, 2 * d, dtype=dtype, device=target.device, seed=9)
        torch.testing.assert_close(ops.silu_and_mul(x).cpu(), REF.silu_and_mul(x.cpu()), **tolerance(dtype))


@pytest.mark.parametrize("rows,d,k", [(1, 24, 64), (2, 9, 96), (7, 16, 64)])
def test_linear_silu_and_mul(target, rows, d, k):
    """The optional ``linear_silu_and_mul`` (a stacked [gate; up] weight ``[2d, k]``) against
    ``reference.ops.linear_silu_and_mul`` in float32; skipped where the backend lacks it (the
    MLP then runs ``linear`` and ``silu_and_mul``)."""
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        if getattr(ops, "linear_silu_and_mul", None) is None:
            pytest.skip(f"{target.name} has no linear_silu_and_mul (optional)")
        x = _rand(rows, k, dtype=dtype, device=target.device, seed=10)
        w = (_rand(2 * d, k, dtype=torch.float32, device=target.device, seed=11) * 0.2).to(dtype)
        b = _rand(2 * d, dtype=dtype, device=target.device, seed=12)
        out = ops.linear_silu_and_mul(x, w, b)
        assert out.shape == (rows, d) and out.dtype == dtype
        want = linear_silu_and_mul(x.cpu().float(), w.cpu().float(), b.cpu().float()).to(dtype)
        torch.testing.assert_close(out.cpu(), want, **tolerance(dtype))


@pytest.mark.parametrize("rows,n,k", [(1, 24, 64), (1, 50, 96), (2, 16, 64)])
def test_linear_add_rms_norm(target, rows, n, k):
    """The optional ``linear_add_rms_norm`` (``fused_add_rms_norm`` of ``linear``'s output:
    ``(normed, residual)``) against ``reference.ops.linear_add_rms_norm`` in float32; skipped
    where the backend lacks it (the decoder then runs ``linear`` and the norm)."""
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        if getattr(ops, "linear_add_rms_norm", None) is None:
            pytest.skip(f"{target.name} has no linear_add_rms_norm (optional)")
        x = _rand(rows, k, dtype=dtype, device=target.device, seed=13)
        w = (_rand(n, k, dtype=torch.float32, device=target.device, seed=14) * 0.2).to(dtype)
        b = _rand(n, dtype=dtype, device=target.device, seed=15)
        r = _rand(rows, n, dtype=dtype, device=target.device, seed=16)
        g = _rand(n, dtype=dtype, device=target.device, seed=17)
        out, res = ops.linear_add_rms_norm(x, w, r.clone(), g, 1e-5, b)
        assert out.shape == (rows, n) and res.shape == (rows, n) and res.dtype == dtype
        want_out, want_res = linear_add_rms_norm(x.cpu().float(), w.cpu().float(),
                                                 r.cpu().float(), g.cpu().float(), 1e-5,
                                                 b.cpu().float())
        torch.testing.assert_close(res.cpu(), want_res.to(dtype), **tolerance(dtype))
        torch.testing.assert_close(out.cpu().float(), want_out, **_norm_tolerance(dtype))


@pytest.mark.parametrize("rows,h,k,n", [(1, 64, 48, 40), (1, 96, 32, 24), (2, 64, 32, 16)])
def test_linear_norm_fold(target, rows, h, k, n):
    """The optional pair ``linear_add_rms_norm_fold`` / ``linear_rms_scaled`` (API 24: a
    residual-add RMSNorm split between the product before it and the product after it), each
    against its oracle in ``reference.ops`` and together against the unfused path (product,
    ``fused_add_rms_norm``, product), plain and with ``silu_and_mul``; skipped where the
    backend lacks them (the decoder then runs the three)."""
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        if (getattr(ops, "linear_add_rms_norm_fold", None) is None
                or getattr(ops, "linear_rms_scaled", None) is None):
            pytest.skip(f"{target.name} has no linear_add_rms_norm_fold / linear_rms_scaled "
                        "(optional)")
        dev = target.device
        x = _rand(rows, k, dtype=dtype, device=dev, seed=20)
        w = (_rand(h, k, dtype=torch.float32, device=dev, seed=21) * 0.2).to(dtype)
        r = _rand(rows, h, dtype=dtype, device=dev, seed=22)
        g = (1 + 0.3 * _rand(h, dtype=torch.float32, device=dev, seed=23)).to(dtype)
        wc = (_rand(2 * n, h, dtype=torch.float32, device=dev, seed=24) * 0.2).to(dtype)
        b = _rand(2 * n, dtype=dtype, device=dev, seed=25)
        xg, sumsq, res = ops.linear_add_rms_norm_fold(x, w, r.clone(), g)
        assert xg.shape == (rows, h) and xg.dtype == dtype and res.shape == (rows, h)
        assert sumsq.dtype == torch.float32 and sumsq.dim() == 1
        want_xg, want_ss, want_res = linear_add_rms_norm_fold(x.cpu(), w.cpu(), r.cpu(), g.cpu())
        torch.testing.assert_close(res.cpu(), want_res, **tolerance(dtype))
        torch.testing.assert_close(xg.cpu(), want_xg, **_norm_tolerance(dtype))
        torch.testing.assert_close(sumsq.sum().cpu(), want_ss.sum(), rtol=1e-2, atol=1e-3)
        if rows != 1:
            continue  # the pair serves batch-1 decode; several rows share no sum of squares
        normed, _ = REF.fused_add_rms_norm(x.cpu().float() @ w.cpu().float().T, r.cpu().float(),
                                           g.cpu().float(), 1e-5)
        for silu in (False, True):
            out = ops.linear_rms_scaled(xg, wc, sumsq, 1e-5, b, silu_and_mul=silu)
            assert out.shape == (rows, n if silu else 2 * n) and out.dtype == dtype
            want = linear_rms_scaled(xg.cpu(), wc.cpu(), sumsq.cpu(), 1e-5, b.cpu(), silu)
            torch.testing.assert_close(out.cpu().float(), want.float(), **_norm_tolerance(dtype))
            unfused = normed @ wc.cpu().float().T + b.cpu().float()
            if silu:
                unfused = REF.silu_and_mul(unfused)
            torch.testing.assert_close(out.cpu().float(), unfused, **_norm_tolerance(dtype))


def _norm_tolerance(dtype):
    """A normed row of a rounded product: each element may sit one model-dtype rounding of the
    residual away from the float32 oracle, scaled by the norm."""
    if dtype == torch.float32:
        return tolerance(dtype)
    return dict(atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("mode", GATED_NORM_MODES)
@pytest.mark.parametrize("rows,channels,group_size,shared", [(1, 64, 64, False),
                                                             (5, 96, 48, False),
                                                             (3, 64, 16, True)])
def test_gated_rms_norm(target, mode, rows, channels, group_size, shared):
    """The optional ``gated_rms_norm`` (plugin API 19: the recurrent mixers' gated RMSNorm, a
    weight per channel or shared by the groups, ``z`` a column view) against
    ``reference/gated_norm.py``; skipped where the backend lacks it (the layers then run the
    reference's torch ops)."""
    from tessellm.backends.reference.gated_norm import gated_rms_norm

    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        if getattr(ops, "gated_rms_norm", None) is None:
            pytest.skip(f"{target.name} has no gated_rms_norm (optional)")
        y = _rand(rows, channels, dtype=dtype, device=target.device, seed=14)
        z = _rand(rows, channels + 8, dtype=dtype, device=target.device, seed=15)[:, 3:3 + channels]
        w = _rand(group_size if shared else channels, dtype=dtype, device=target.device, seed=16)
        out = ops.gated_rms_norm(y, z, w, group_size, 1e-5, mode)
        assert out.shape == y.shape and out.dtype == dtype
        want = gated_rms_norm(y.cpu(), z.cpu(), w.cpu(), group_size, 1e-5, mode)
        torch.testing.assert_close(out.cpu(), want, **tolerance(dtype))


def _fp8_close(xa, y, dtype, what: str):
    """An ``Fp8Activation`` against the reference op's unquantized output ``y``: the layout of
    the contract, each row's scale ``max|y| / FP8_MAX`` within the model dtype's error, and the
    dequantized rows within fp8's (e4m3: 1/16 relative)."""
    fp8 = torch.float8_e4m3fn
    rows, k = y.shape
    assert xa.qx.shape == (rows, k) and xa.qx.dtype == fp8, \
        f"{what}: qx {tuple(xa.qx.shape)} {xa.qx.dtype}"
    assert xa.scales.shape == (rows, 1) and xa.scales.dtype == torch.float32, f"{what}: scales"
    assert xa.dtype == dtype, f"{what}: dtype {xa.dtype}, expected {dtype}"
    yf = y.float()
    want = yf.abs().amax(-1, keepdim=True).clamp(min=1e-12) / torch.finfo(fp8).max
    torch.testing.assert_close(xa.scales.cpu(), want, rtol=0.03 if dtype != torch.float32 else 1e-4,
                               atol=0)
    rel = ((xa.qx.cpu().float() * xa.scales.cpu() - yf).norm() / yf.norm()).item()
    assert rel < 0.15, f"{what}: dequantized rows off by {rel:.3f} (relative)"


def test_fp8_activation_fold(target):
    """The optional fp8 activation fold (``rms_norm_fp8``, ``fused_add_rms_norm_fp8``,
    ``silu_and_mul_fp8``: the op's output quantized to fp8 per token, an ``Fp8Activation``)
    against ``reference.ops``' plain ops; skipped where the backend lacks them (the layers then
    hand the fp8 linear its model-dtype input)."""
    fp8 = torch.float8_e4m3fn
    tried = 0
    for dtype in _dtypes(target):
        ops = _ops(target, dtype)
        x = _rand(7, 96, dtype=dtype, device=target.device, seed=13) * 3
        r = _rand(7, 96, dtype=dtype, device=target.device, seed=14)
        w = _rand(96, dtype=dtype, device=target.device, seed=15)
        if getattr(ops, "rms_norm_fp8", None) is not None:
            xa = ops.rms_norm_fp8(x, w, 1e-6, fp8)
            _fp8_close(xa, REF.rms_norm(x.cpu(), w.cpu(), 1e-6), dtype, "rms_norm_fp8")
            tried += 1
        if getattr(ops, "fused_add_rms_norm_fp8", None) is not None:
            ref_out, ref_res = REF.fused_add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-6)
            xa, res = ops.fused_add_rms_norm_fp8(x.clone(), r.clone(), w, 1e-6, fp8)
            torch.testing.assert_close(res.cpu(), ref_res, **tolerance(dtype))
            _fp8_close(xa, ref_out, dtype, "fused_add_rms_norm_fp8")
            tried += 1
        if getattr(ops, "silu_and_mul_fp8", None) is not None:
            xa = ops.silu_and_mul_fp8(x, fp8)
            _fp8_close(xa, REF.silu_and_mul(x.cpu()), dtype, "silu_and_mul_fp8")
            tried += 1
    if not tried:
        pytest.skip(f"{target.name} has no fp8 activation fold (optional)")
