"""The cpu backend's ``linear``: float32 products on oneDNN's packed weights (the LM head
included); without a packed copy, wide products in column blocks, bitwise equal to one
``F.linear``; everything else passed straight through."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tessellm.backends.cpu import ops as cpu_ops


@pytest.mark.parametrize("m", [1, 8, 13, 64])
def test_blocked_product_is_bitwise_one_product(m, monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_PACKED_WEIGHTS_MB", "0")  # no packed copies: the blocked path
    g = torch.Generator().manual_seed(m)
    n = cpu_ops.MIN_N + 3 * cpu_ops.BLOCK_N + 77  # a last block that is partial
    w = torch.randn(n, 96, generator=g) * 0.05
    x = torch.randn(m, 96, generator=g)
    out = cpu_ops.CpuOps().linear(x, w)
    assert out.shape == (m, n)
    assert torch.equal(out, F.linear(x, w))


def test_blocks_only_where_they_pay(monkeypatch):
    monkeypatch.setenv("TESSELLM_CPU_PACKED_WEIGHTS_MB", "0")
    calls = []
    real_mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda *a, **k: calls.append(1) or real_mm(*a, **k))
    ops = cpu_ops.CpuOps()
    w = torch.randn(cpu_ops.MIN_N, 32)
    ops.linear(torch.randn(cpu_ops.MIN_M, 32), w)
    assert len(calls) == cpu_ops.MIN_N // cpu_ops.BLOCK_N
    calls.clear()
    ops.linear(torch.randn(cpu_ops.MIN_M - 1, 32), w)  # too few rows
    ops.linear(torch.randn(cpu_ops.MIN_M, 32), w[:cpu_ops.MIN_N - 1])  # too few columns
    ops.linear(torch.randn(cpu_ops.MIN_M, 32).bfloat16(), w.bfloat16())  # not float32
    ops.linear(torch.randn(cpu_ops.MIN_M, 32), w, torch.zeros(cpu_ops.MIN_N))  # a bias
    assert calls == []


def test_the_cpu_backend_routes_the_lm_head_through_it(tiny_model_dir):
    from tessellm import LLM

    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", num_kv_blocks=16)
    model = llm.engine.core.runner.model
    assert getattr(model.lm_head.dense_mm, "__func__", None) is cpu_ops.CpuOps.linear


@pytest.mark.parametrize("n", [100, 2048, 3001, 49152])
def test_chunked_argmax_is_torch_argmax(n):
    """Exactly ``torch.argmax``: ties (in one chunk, across chunks, in the partial last chunk),
    NaN, all -inf rows, and the exponential race's divisor."""
    g = torch.Generator().manual_seed(n)
    assert cpu_ops.ARGMAX_MIN_ROWS <= 6  # the two-pass path runs
    x = torch.randn(6, n, generator=g)
    x[1, n - 1] = x[1, n // 2] = 50.0  # a tie across chunks: the first wins
    x[2, n - 1] = 50.0  # the maximum in the last column
    x[3, 7] = x[3, 5] = 50.0  # a tie inside one chunk
    x[4, n // 3] = float("nan")  # NaN is torch's maximum
    x[5] = float("-inf")
    assert torch.equal(cpu_ops.chunked_argmax(x), x.argmax(dim=-1))
    q = torch.empty(6, n).exponential_(generator=g)
    probs = torch.softmax(torch.randn(6, n, generator=g), dim=-1)
    assert torch.equal(cpu_ops.chunked_argmax(probs, q), (probs / q).argmax(dim=-1))


def test_the_cpu_backend_samples_with_it():
    from tessellm.backends.registry import get_registry
    from tessellm.backends.spec import LogitsOpsSpec

    registry = get_registry()
    ops = registry.provider("tessellm_logits_ops", registry.select("cpu"), LogitsOpsSpec(torch.float32))[0]
    assert ops.argmax is cpu_ops.chunked_argmax


@pytest.mark.parametrize("m", [1, 7, 64])
def test_packed_linear_matches_f_linear_and_follows_weight_updates(m):
    """The layer products (N < MIN_N) on oneDNN's packed weight: F.linear's result up to float32
    summation order, with and without bias; an in-place weight update is seen (repacked)."""
    g = torch.Generator().manual_seed(m)
    ops = cpu_ops.CpuOps()
    w = torch.randn(96, 80, generator=g) * 0.05
    b = torch.randn(96, generator=g)
    x = torch.randn(m, 80, generator=g)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ops.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        w.mul_(-2.0)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    if ops.onednn:
        assert len(ops._packed) == 1  # one entry per weight, replaced when it changed


@pytest.mark.parametrize("m", [1, 9, 64])
def test_the_lm_head_runs_on_its_packed_copy(m):
    """A vocabulary-wide product takes the packed path too (0.45-0.81x of the blocked MKL
    product on 2 cores), F.linear's result up to float32 summation order."""
    ops = cpu_ops.CpuOps()
    if not ops.onednn:
        pytest.skip("no oneDNN in this torch build")
    g = torch.Generator().manual_seed(m)
    w = torch.randn(cpu_ops.MIN_N + 77, 96, generator=g) * 0.05
    x = torch.randn(m, 96, generator=g)
    torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert id(w) in ops._packed


def test_packed_copies_stop_at_the_memory_cap(monkeypatch):
    """Past TESSELLM_CPU_PACKED_WEIGHTS_MB the weights stay on F.linear (no second copy); a
    repack of a weight already held does not count twice."""
    monkeypatch.setenv("TESSELLM_CPU_PACKED_WEIGHTS_MB", "1")  # 1 MiB: one 512x256 float32 weight (0.5 MiB) fits
    ops = cpu_ops.CpuOps()
    if not ops.onednn:
        pytest.skip("no oneDNN in this torch build")
    g = torch.Generator().manual_seed(0)
    w1, w2, w3 = (torch.randn(512, 256, generator=g) * 0.05 for _ in range(3))
    x = torch.randn(4, 256, generator=g)
    for w in (w1, w2, w3):
        torch.testing.assert_close(ops.linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert [id(w) in ops._packed for w in (w1, w2, w3)] == [True, True, False]
    with torch.no_grad():
        w1.mul_(0.5)  # repacked in its own slot: w3 still does not fit
    torch.testing.assert_close(ops.linear(x, w1), F.linear(x, w1), rtol=1e-5, atol=1e-5)
    ops.linear(x, w3)
    assert ops._packed_bytes == 2 * w1.numel() * 4 and id(w3) not in ops._packed
    monkeypatch.setenv("TESSELLM_CPU_PACKED_WEIGHTS_MB", "0")
    assert cpu_ops.CpuOps()._pack(w1) is None  # 0 turns packing off


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_and_mul_is_the_references_bitwise(dtype):
    from tessellm.backends.reference.ops import ReferenceOps

    x = torch.randn(37, 2 * 96, generator=torch.Generator().manual_seed(0)).to(dtype)
    out = cpu_ops.CpuOps().silu_and_mul(x)
    assert out.shape == (37, 96) and out.dtype == dtype
    assert torch.equal(out, ReferenceOps().silu_and_mul(x))
    assert torch.equal(cpu_ops.CpuOps().silu_and_mul(x[None]), ReferenceOps().silu_and_mul(x[None]))


@pytest.mark.parametrize("shape", [(1, 576), (64, 576), (2048, 576), (3, 4096), (5, 40)])
def test_rms_norm_is_the_references_bitwise(shape):
    """float32 RMSNorm in one aten call: the reference's bits (greedy parity with HF rests on
    it); bfloat16 stays on the reference."""
    from tessellm.backends.reference.ops import ReferenceOps

    g = torch.Generator().manual_seed(shape[0])
    ops, ref = cpu_ops.CpuOps(), ReferenceOps()
    x, w = torch.randn(*shape, generator=g) * 3, torch.randn(shape[-1], generator=g)
    assert torch.equal(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))
    r = torch.randn(*shape, generator=g)
    for a, b in zip(ops.fused_add_rms_norm(x, r, w, 1e-5), ref.fused_add_rms_norm(x, r, w, 1e-5)):
        assert torch.equal(a, b)
    xb, wb = x.bfloat16(), w.bfloat16()
    assert torch.equal(ops.rms_norm(xb, wb, 1e-6), ref.rms_norm(xb, wb, 1e-6))


@pytest.mark.parametrize("rot", [64, 32])
def test_native_rotary_is_the_references_bitwise(rot):
    """q and k as views into one qkv row (as the models pass them), full and partial rotary:
    rotated in place by the C kernel, bitwise the reference's result."""
    from tessellm.backends.cpu import native
    from tessellm.backends.reference.ops import ReferenceOps

    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(rot)
    ops = cpu_ops.CpuOps()
    for t in (1, 5, 64):  # serial and threaded
        qkv = torch.randn(t, (9 + 3 + 3) * 64, generator=g)
        positions = torch.randint(0, 500, (t,), generator=g)
        cos_sin = torch.randn(512, rot, generator=g)
        q, k = qkv[:, :576], qkv[:, 576:768]
        want_q, want_k = ReferenceOps().rotary_embedding(positions, q.clone(), k.clone(), cos_sin, 64)
        v_before = qkv[:, 768:].clone()
        got_q, got_k = ops.rotary_embedding(positions, q, k, cos_sin, 64)
        assert got_q.data_ptr() == q.data_ptr()  # in place, the native path
        assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
        assert torch.equal(qkv[:, 768:], v_before)


@pytest.mark.parametrize("n", [16, 48, 64, 576, 960, 4096])
def test_native_rms_norm_is_the_references_bitwise(n):
    """The C add + RMSNorm (csrc/norm.c) reproduces torch's float32 sum order: bitwise the
    reference's result, with and without a residual, 1 to 56 rows (the 32768-value limit)."""
    from tessellm.backends.cpu import native
    from tessellm.backends.reference.ops import ReferenceOps

    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(n)
    ops, ref = cpu_ops.CpuOps(), ReferenceOps()
    w = torch.randn(n, generator=g)
    for rows in (1, 3, cpu_ops.NORM_MAX_NUMEL // n):
        for scale in (1e-2, 1.0, 50.0):
            x, r = (torch.randn(rows, n, generator=g) * scale for _ in range(2))
            native_out = ops._native_norm(x, r, w, 1e-5)
            assert native_out is not None and ops._norm_lanes[n] in (8, 16)
            want = ref.fused_add_rms_norm(x, r, w, 1e-5)
            assert torch.equal(native_out[0], want[0]) and torch.equal(native_out[1], want[1])
            assert torch.equal(ops.rms_norm(x, w, 1e-6), ref.rms_norm(x, w, 1e-6))


@pytest.mark.parametrize("d", [8, 40, 96, 576, 1536, 2048])
def test_native_silu_and_mul_is_the_references_bitwise(d):
    """The C SiLU-and-mul (csrc/silu_mul.c: SLEEF's expf on torch's vector blocks, the C
    library's on each row's tail) is bitwise ``F.silu(gate) * up``, 1 row to the 32767-output
    limit, magnitudes from 1e-3 to past exp's limits (+-104), zeros, infinities and NaN."""
    from tessellm.backends.cpu import native
    from tessellm.backends.reference.ops import ReferenceOps

    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    g = torch.Generator().manual_seed(d)
    ops, ref = cpu_ops.CpuOps(), ReferenceOps()
    for rows in (1, 3, cpu_ops.SILU_MAX_NUMEL // d):
        for scale in (1e-3, 1.0, 10.0, 150.0):
            x = torch.randn(rows, 2 * d, generator=g) * scale
            x[0, : min(d, 6)] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e38])[: min(d, 6)]
            got = ops._native_silu(x, d)
            assert got is not None and ops._silu_block[d] in (16, 32)
            want = ref.silu_and_mul(x)
            assert torch.equal(got.nan_to_num(), want.nan_to_num())
            assert torch.equal(got.isnan(), want.isnan())
            batched = ops.silu_and_mul(x[None])  # leading dims: the same native call
            assert torch.equal(batched.nan_to_num(), want[None].nan_to_num())
    big = torch.randn(cpu_ops.SILU_MAX_NUMEL // d + 1, 2 * d, generator=g)
    assert ops._native_silu(big, d) is None  # past the limit: torch's path
    assert torch.equal(ops.silu_and_mul(big), ref.silu_and_mul(big))


def test_native_rms_norm_steps_aside():
    """Inputs it does not take go through torch: too many values, a strided row, bfloat16, a
    row width that is not a multiple of 16."""
    from tessellm.backends.cpu import native

    if native.load() is None:
        pytest.skip(f"native kernels unavailable here: {native.unavailable_reason()}")
    ops, w = cpu_ops.CpuOps(), torch.randn(64)
    assert ops._native_norm(torch.randn(cpu_ops.NORM_MAX_NUMEL // 64 + 1, 64), None, w, 1e-6) is None
    assert ops._native_norm(torch.randn(4, 128)[:, :64], None, w, 1e-6) is None
    assert ops._native_norm(torch.randn(4, 64).bfloat16(), None, w, 1e-6) is None
    assert ops._native_norm(torch.randn(4, 64), torch.randn(4, 64).double(), w, 1e-6) is None
    assert ops._native_norm(torch.randn(1, 17), None, torch.randn(17), 1e-6) is None
    assert ops._native_norm(torch.randn(4, 64), None, w, 1e-6) is not None
