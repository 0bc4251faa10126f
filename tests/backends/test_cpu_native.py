"""The cpu backend's C decode kernel (``csrc/paged_decode.c``, built by ``native.py``) against the
pure-torch reference: shuffled block tables, GQA, ragged contexts (1 token, block boundaries,
several tiles), float32 and bfloat16 caches, sliding windows, prefill chunks in the same step;
a sequence of length 0 gives zeros; ``TESSELLM_CPU_NATIVE=0`` keeps the torch path."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.cpu import native
from tessellm.backends.cpu.attention import CpuAttentionKernel, NativeDecode
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step


@pytest.fixture(scope="module")
def lib():
    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    return native.load()


def _kernel(step_heads, kvh, d, dtype, bs, window):
    return CpuAttentionKernel(AttentionSpec(step_heads, kvh, d, dtype, bs, "auto", window))


@pytest.mark.parametrize("dtype,bs,group,window,head", [
    (torch.float32, 4, 3, None, 64), (torch.float32, 64, 3, None, 64), (torch.float32, 16, 1, 21, 64),
    (torch.bfloat16, 16, 4, None, 64), (torch.bfloat16, 4, 2, 7, 64),
    # 16-token tiles inside 32-token blocks, a window start off the tile grid; head sizes of
    # the plain-C path (40) and of 8 vectors a row (128)
    (torch.float32, 32, 2, 45, 128), (torch.float32, 16, 3, None, 40), (torch.bfloat16, 32, 3, 19, 40)])
def test_native_decode_matches_reference(lib, dtype, bs, group, window, head):
    ctx = [0, bs - 1, bs, 2 * bs - 1, 37, 150, 3, 90, 12]  # seq lens 1, bs, bs + 1, 2 bs, ...
    qlens = [1] * 7 + [5, 12]  # seven decodes, then two prefill chunks over cached context
    step = make_paged_step(qlens, ctx, num_kv_heads=2, group=group, head_size=head, block_size=bs,
                           dtype=dtype, device="cpu", window=window, seed=11)
    _assert_native_decodes_match(lib, _kernel(2 * group, 2, head, dtype, bs, window), step, dtype)
    assert torch.equal(step.k_cache, step.ref_k_cache) and torch.equal(step.v_cache, step.ref_v_cache)


def _assert_native_decodes_match(lib, kernel, step, dtype):
    """``step``'s seven decodes run in the C kernel and the whole step equals the reference."""
    assert kernel.native is lib
    md = kernel.build_metadata(step.batch)
    assert md.native_decode is not None and md.native_decode.n == 7 and not md.decode_groups
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), step.ref_out.float(), rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype,bs,window,head", [
    (torch.float32, 16, None, 64), (torch.float32, 32, 45, 128),  # 16-token vector tiles
    (torch.float32, 16, None, 40), (torch.bfloat16, 32, 19, 40),  # the plain-C tiles
    (torch.bfloat16, 4, 7, 64)])
def test_native_decode_soft_caps_like_the_reference(lib, dtype, bs, window, head):
    """A soft-capped layer (Gemma 2) decodes in the C kernel, each scaled score ``cap * tanh(s /
    cap)`` before the softmax, equal to ``paged_attention(..., logit_softcap=cap)``. Queries of
    gain 4 (scores of std ~4) under cap 1.5: the cap changes every row."""
    ctx = [1, bs - 1, bs, 2 * bs - 1, 37, 150, 3, 90, 12]  # 2 keys at least: a cap changes them
    qlens = [1] * 7 + [5, 12]
    mk = dict(num_kv_heads=2, group=3, head_size=head, block_size=bs, dtype=dtype, device="cpu",
              window=window, seed=7, q_gain=4.0)
    step = make_paged_step(qlens, ctx, logit_softcap=1.5, **mk)
    uncapped = make_paged_step(qlens, ctx, **mk).ref_out
    assert (step.ref_out - uncapped).abs().amax(dim=(1, 2)).min() > 0.05  # the cap matters everywhere
    kernel = CpuAttentionKernel(AttentionSpec(6, 2, head, dtype, bs, "auto", window, logit_softcap=1.5))
    _assert_native_decodes_match(lib, kernel, step, dtype)


def test_zero_length_gives_zeros_and_one_openmp_runtime(lib):
    step = make_paged_step([1, 1, 1], [5, 30, 8], num_kv_heads=3, group=3, head_size=32,
                           block_size=8, dtype=torch.float32, device="cpu", seed=3)
    kernel = _kernel(9, 3, 32, torch.float32, 8, None)
    kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                   kernel.build_metadata(step.batch), step.scale)  # writes this step's K/V
    lens = step.batch.seq_lens.clone()
    lens[1] = 0  # a graph padding row
    nat = NativeDecode(3, step.batch.block_tables.contiguous(), lens)
    out = torch.full((3, 9, 32), float("nan"))
    kernel._native_decode(step.q, step.k_cache, step.v_cache, nat, step.scale, out)
    assert torch.equal(out[1], torch.zeros(9, 32))
    torch.testing.assert_close(out[[0, 2]], step.ref_out[[0, 2]], rtol=1e-5, atol=1e-5)
    assert len(native._openmp_libs()) == 1  # torch's libgomp, shared with the C kernel


def test_native_off_keeps_the_torch_path(monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is None and native.unavailable_reason() == "TESSELLM_CPU_NATIVE=0"
    step = make_paged_step([1, 1, 4], [20, 3, 9], num_kv_heads=2, group=3, head_size=16,
                           block_size=4, dtype=torch.float32, device="cpu", seed=2)
    kernel = _kernel(6, 2, 16, torch.float32, 4, None)
    assert kernel.native is None
    md = kernel.build_metadata(step.batch)
    assert md.native_decode is None and md.decode_groups
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale)
    torch.testing.assert_close(out, step.ref_out, rtol=1e-5, atol=1e-5)


def test_no_compiler_falls_back_with_the_reason(monkeypatch, tmp_path):
    if not any("gomp" in lib for lib in native._openmp_libs()):
        pytest.skip("torch without GNU OpenMP: load() refuses before looking for a compiler")
    monkeypatch.delenv("TESSELLM_CPU_NATIVE", raising=False)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty folder: no cc, gcc or clang
    monkeypatch.setattr(native, "_state", {})
    assert native.load() is None
    assert "no C compiler" in native.unavailable_reason()
    assert _kernel(6, 2, 16, torch.float32, 4, None).native is None


# a bfloat16 cache under float32 q: only the fused decode takes it (the SDPA paths want one dtype)
@pytest.mark.parametrize("cache_dtype,window,qlens,cap", [
    (torch.float32, None, [1, 1, 1, 1], None), (torch.float32, 9, [1, 1, 1, 1], None),
    (torch.bfloat16, None, [1, 1, 1, 1], None), (torch.float32, None, [1, 1, 3], None),
    (torch.float32, 9, [1, 1, 3], None), (torch.float32, 9, [1, 1, 1, 1], 1.5)])
def test_fused_rotary_step_is_rotating_first_bitwise(lib, cache_dtype, window, qlens, cap):
    """``forward`` with the rotary inputs (``fuses_rotary``): a step of decodes only runs
    ``tl_decode_step`` (rotary, cache write, attention in one call), a mixed step rotates first;
    either way the output and both caches are bitwise those of rotating with ``CpuOps`` and
    calling ``forward`` without them. q, k, v are views into one qkv row, as the model passes.
    With a soft-cap the fused call caps too (its output equals the separate path's)."""
    from tessellm.backends.cpu.ops import CpuOps

    ctx = [0, 15, 40, 7][:len(qlens)]
    step = make_paged_step(qlens, ctx, num_kv_heads=2, group=3, head_size=64, block_size=16,
                           dtype=cache_dtype, device="cpu", window=window, seed=5, q_gain=4.0)
    kernel = CpuAttentionKernel(AttentionSpec(6, 2, 64, cache_dtype, 16, "auto", window, logit_softcap=cap))
    t = step.q.shape[0]
    qkv = torch.cat([x.float().reshape(t, -1) for x in (step.q, step.k, step.v)], dim=1)
    positions = torch.cat([torch.arange(c, c + n) for c, n in zip(ctx, qlens)])
    cos_sin = torch.randn(128, 64, generator=torch.Generator().manual_seed(1))

    def views(row):
        q, k, v = row.split([6 * 64, 2 * 64, 2 * 64], dim=1)
        return q.view(t, 6, 64), k.view(t, 2, 64), v.view(t, 2, 64)

    md = kernel.build_metadata(step.batch)
    assert (md.native_decode.n == t) == (qlens == [1] * 4)
    k_first, v_first = step.k_cache.clone(), step.v_cache.clone()
    q, k, v = views(qkv.clone())
    q2, k2 = CpuOps().rotary_embedding(positions, q.reshape(t, -1), k.reshape(t, -1), cos_sin, 64)
    want = kernel.forward(q2.view(t, 6, 64), k2.view(t, 2, 64), v, k_first, v_first, md, step.scale)
    got = kernel.forward(*views(qkv.clone()), step.k_cache, step.v_cache, md, step.scale,
                         positions=positions, cos_sin_cache=cos_sin)
    assert torch.equal(got, want)
    assert torch.equal(step.k_cache, k_first) and torch.equal(step.v_cache, v_first)
