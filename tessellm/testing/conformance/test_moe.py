"""``FusedOps.fused_moe`` (optional) against the reference loop over experts: softmax and
sigmoid routing, top-k 1/2/8, experts that receive no token, and fp8 per-channel experts; and
``fused_experts`` (optional: the same with the routing given); the declared variants (gpt-oss's
clamped SwiGLU with biases, Nemotron-H's ungated relu2, block-wise fp8, expert parallelism's
``expert_map``, AWQ / GPTQ int4 experts, GPTQ act-order int4 experts, bitsandbytes 4-bit
experts)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.moe import (ExpertActivation, fused_experts_reference,
                                             fused_moe_reference)
from tessellm.backends.spec import OpsSpec
from tessellm.testing.harness import tolerance


def _moe_ops(target, dtype):
    ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
    if ops is None or getattr(ops, "fused_moe", None) is None:
        pytest.skip(f"{target.name} provides no fused_moe (MoE models run the reference loop)")
    return ops


def _moe_ops_with(target, dtype, kind: str, family: str):
    """``_moe_ops`` whose ``fused_moe_activations`` declare ``kind`` (else the case skips)."""
    ops = _moe_ops(target, dtype)
    if kind not in getattr(ops, "fused_moe_activations", ("silu",)):
        pytest.skip(f"{target.name}'s fused_moe does not declare {kind} ({family}'s experts run "
                    "the reference loop)")
    return ops


def _experts(e, h, i, seed):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(e, 2 * i, h, generator=g) / h ** 0.5,
            torch.randn(e, h, i, generator=g) / i ** 0.5)


@pytest.mark.parametrize("tokens,top_k,scoring,renormalize", [
    (1, 1, "softmax", True), (6, 2, "softmax", False), (9, 8, "sigmoid", True)])
def test_fused_moe(target, tokens, top_k, scoring, renormalize):
    e, h, i = 16, 64, 32  # with 1-6 tokens most experts get none
    w13, w2 = _experts(e, h, i, seed=tokens)
    g = torch.Generator().manual_seed(100 + tokens)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops(target, dtype)
        args = [t.to(dtype) for t in (x, logits, w13, w2)]
        want = fused_moe_reference(*args, top_k, scoring, renormalize)
        got = ops.fused_moe(*[t.to(target.device) for t in args], top_k, scoring, renormalize)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (7, 3), (40, 8)])
def test_fused_experts(target, tokens, top_k):
    """The optional ``fused_experts``: the routing given (weights as they are, not summing to
    1, as DeepSeek's scaled grouped top-k gives them)."""
    e, h, i = 16, 64, 32
    w13, w2 = _experts(e, h, i, seed=50 + tokens)
    g = torch.Generator().manual_seed(60 + tokens)
    x = torch.randn(tokens, h, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g) * 2.5
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = target.registry.fused_ops(target.backend, OpsSpec(dtype))
        if ops is None or getattr(ops, "fused_experts", None) is None:
            pytest.skip(f"{target.name} provides no fused_experts (DeepSeek runs the reference)")
        args = [t.to(dtype) for t in (x, w13, w2)]
        want = fused_experts_reference(args[0], weights, ids, *args[1:])
        dev = target.device
        got = ops.fused_experts(args[0].to(dev), weights.to(dev), ids.to(dev), args[1].to(dev),
                                args[2].to(dev))
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


def test_fused_moe_fp8_experts(target):
    """Per-output-channel fp8 weights with float32 scales (W8A16)."""
    dtype = target.low_precision_dtype
    ops = _moe_ops(target, dtype)
    w13, w2 = _experts(8, 64, 32, seed=3)
    fmax = torch.finfo(torch.float8_e4m3fn).max
    s13, s2 = w13.abs().amax(-1) / fmax, w2.abs().amax(-1) / fmax
    q13 = (w13 / s13[..., None]).to(torch.float8_e4m3fn)
    q2 = (w2 / s2[..., None]).to(torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(4)
    x, logits = torch.randn(5, 64, generator=g).to(dtype), torch.randn(5, 8, generator=g)
    want = fused_moe_reference(x, logits, q13, q2, 2, "softmax", True, s13, s2)
    dev = target.device
    got = ops.fused_moe(x.to(dev), logits.to(dev), q13.to(dev), q2.to(dev), 2, "softmax", True,
                        s13.to(dev), s2.to(dev))
    torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


@pytest.mark.parametrize("tokens", [1, 9])
def test_fused_moe_clamped_swiglu_with_biases(target, tokens):
    """gpt-oss's experts (optional, declared in ``fused_moe_activations``): the clamped SwiGLU
    (``ExpertActivation("swiglu_oai")``) and per-expert biases on both projections. Gates and
    ups reach past the clamp, so an op that ignores it, or either bias, fails."""
    e, h, i = 8, 64, 32
    w13, w2 = _experts(e, h, i, seed=70 + tokens)
    g = torch.Generator().manual_seed(80 + tokens)
    # gate/up of several units: past the clamp at 3; w2 scaled down so the outputs stay O(1)
    # (in bf16 a sum of terms of ~10 that cancels is off by their ulps, past any tolerance)
    w13, w2 = w13 * 6.0, w2 / 4.0
    b13, b2 = torch.randn(e, 2 * i, generator=g), torch.randn(e, h, generator=g)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    act = ExpertActivation("swiglu_oai", alpha=1.702, limit=3.0)
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops_with(target, dtype, "swiglu_oai", "gpt-oss")
        args = [t.to(dtype) for t in (x, logits, w13, w2)]
        bias = dict(w13_bias=b13.to(dtype), w2_bias=b2.to(dtype))
        want = fused_moe_reference(*args, 2, "softmax", True, activation=act, **bias)
        dev = target.device
        got = ops.fused_moe(*[t.to(dev) for t in args], 2, "softmax", True, None, None,
                            activation=act, **{k: v.to(dev) for k, v in bias.items()})
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


@pytest.mark.parametrize("tokens", [1, 9])
def test_fused_moe_ungated_relu2(target, tokens):
    """Nemotron-H's experts (optional, declared in ``fused_moe_activations``): no gate, ``w13
    [E, I, H]`` the up rows alone, ``relu(up) ** 2`` (``ExpertActivation("relu2")``), through
    ``fused_moe`` and ``fused_experts``; an op reading ``w13`` as gate and up halves fails."""
    e, h, i = 8, 64, 32
    w13, w2 = _experts(e, h, i, seed=90 + tokens)
    w13 = w13[:, :i].contiguous()
    g = torch.Generator().manual_seed(95 + tokens)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    act = ExpertActivation("relu2")
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops_with(target, dtype, "relu2", "Nemotron-H")
        args = [t.to(dtype) for t in (x, logits, w13, w2)]
        want = fused_moe_reference(*args, 2, "sigmoid", True, activation=act)
        dev = target.device
        got = ops.fused_moe(*[t.to(dev) for t in args], 2, "sigmoid", True, None, None,
                            activation=act)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
        experts = getattr(ops, "fused_experts", None)
        if experts is not None:
            weights = torch.rand(tokens, 2, generator=g)
            ids = torch.stack([torch.randperm(e, generator=g)[:2] for _ in range(tokens)])
            want = fused_experts_reference(args[0], weights, ids, args[2], args[3],
                                           activation=act)
            got = experts(args[0].to(dev), weights.to(dev), ids.to(dev), args[2].to(dev),
                          args[3].to(dev), activation=act)
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


def _moe_tolerance(dtype):
    tol = tolerance(dtype)
    # Two chained products plus a weighted sum: a few roundings more than one GEMM.
    return {k: v * 4 for k, v in tol.items()} if dtype != torch.float32 else tol


@pytest.mark.parametrize("tokens", [1, 9])
def test_fused_moe_block_fp8_experts(target, tokens):
    """Block-wise fp8 experts (optional, declared by ``fused_moe_block_fp8``): e4m3 weights with
    a float32 scale per 128x128 block (``w13_scale [E, 2I/128, ceil(H/128)]``, ``w2_scale [E,
    ceil(H/128), ceil(I/128)]``, keyword ``block_shape=(128, 128)``; Qwen3-MoE-FP8 and
    DeepSeek-V3), H = 200 (a short last block), through ``fused_moe`` and ``fused_experts``."""
    from tessellm.quantization.fp8_block import quantize_block_tensors

    dtype = target.low_precision_dtype
    ops = _moe_ops(target, dtype)
    if not getattr(ops, "fused_moe_block_fp8", False):
        pytest.skip(f"{target.name}'s fused_moe does not declare fused_moe_block_fp8 (block fp8 "
                    "experts run the reference loop)")
    w13, w2 = _experts(6, 200, 128, seed=90 + tokens)
    q13, s13 = quantize_block_tensors(w13, (128, 128))
    q2, s2 = quantize_block_tensors(w2, (128, 128))
    g = torch.Generator().manual_seed(91 + tokens)
    x, logits = torch.randn(tokens, 200, generator=g).to(dtype), torch.randn(tokens, 6, generator=g)
    block = dict(block_shape=(128, 128))
    want = fused_moe_reference(x, logits, q13, q2, 2, "softmax", True, s13, s2, **block)
    dev = target.device
    args = [t.to(dev) for t in (q13, q2, s13, s2)]
    got = ops.fused_moe(x.to(dev), logits.to(dev), args[0], args[1], 2, "softmax", True,
                        args[2], args[3], **block)
    assert got.dtype == dtype and got.shape == x.shape
    torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
    if getattr(ops, "fused_experts", None) is not None:
        from tessellm.backends.reference.moe import route

        weights, ids = route(logits, 2)
        got = ops.fused_experts(x.to(dev), weights.to(dev), ids.to(dev), args[0], args[1],
                                args[2], args[3], **block)
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


@pytest.mark.parametrize("tokens,top_k", [(1, 2), (3, 4), (40, 4)])
def test_fused_moe_expert_map(target, tokens, top_k):
    """Expert parallelism (optional, declared by ``fused_moe_expert_map``): keyword
    ``expert_map`` (global id -> local index or -1), ``w13`` / ``w2`` holding the local
    experts only, through ``fused_moe`` and ``fused_experts``. Each of two ranks (one holding
    experts 0..7, another an unordered set of 5) returns the reference's partial sum over its
    experts, and the partial sums of experts 0..7 and 8..15 add up to the whole MoE. 1 and 3
    tokens take the decode-sized paths, 40 the grouped ones."""
    e, h, i = 16, 64, 32
    w13, w2 = _experts(e, h, i, seed=120 + tokens)
    g = torch.Generator().manual_seed(130 + tokens)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    held_sets = [list(range(8)), [13, 2, 9, 15, 6], list(range(8, 16))]
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops(target, dtype)
        if not getattr(ops, "fused_moe_expert_map", False):
            pytest.skip(f"{target.name}'s fused_moe does not declare fused_moe_expert_map "
                        "(expert parallelism is refused on it)")
        dev = target.device
        xd, ld = x.to(dtype), logits  # float32 logits: 40 tokens of bf16 ones tie
        whole = fused_moe_reference(xd, ld, w13.to(dtype), w2.to(dtype), top_k)
        parts = []
        for held in held_sets:
            expert_map = torch.full((e,), -1, dtype=torch.int32)
            expert_map[held] = torch.arange(len(held), dtype=torch.int32)
            local13, local2 = w13[held].to(dtype), w2[held].to(dtype)
            want = fused_moe_reference(xd, ld, local13, local2, top_k, expert_map=expert_map)
            local = [t.to(dev) for t in (local13, local2)]
            got = ops.fused_moe(xd.to(dev), ld.to(dev), *local, top_k,
                                expert_map=expert_map.to(dev))
            assert got.dtype == dtype and got.shape == x.shape
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
            if getattr(ops, "fused_experts", None) is not None:
                from tessellm.backends.reference.moe import route

                weights, ids = route(ld, top_k)
                got = ops.fused_experts(xd.to(dev), weights.to(dev), ids.to(dev), *local,
                                        expert_map=expert_map.to(dev))
                torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
            parts.append(want.float())
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else _moe_tolerance(dtype)
        torch.testing.assert_close(parts[0] + parts[2], whole.float(), **tol)


def _int4_experts(e: int, n: int, k: int, group: int, seed: int):
    """Random ``[E, N, K]`` weights quantized round-to-nearest (asymmetric) in the contract's
    int4 layout: ``(codes int32 [E, N, K/8], scales [E, N, K/group], zeros uint8)``."""
    from tessellm.quantization.packed import pack_int4, quantize_int4

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(e, n, k, generator=g) / k ** 0.5
    parts = [quantize_int4(we, group) for we in w]
    return (torch.stack([pack_int4(q).t() for q, _, _ in parts]).contiguous(),
            torch.stack([s.t() for _, s, _ in parts]).half().contiguous(),
            torch.stack([z.t().to(torch.uint8) for _, _, z in parts]).contiguous())


@pytest.mark.parametrize("tokens", [1, 9, 40])
def test_fused_moe_int4_experts(target, tokens):
    """AWQ / GPTQ int4 experts (optional, declared by ``fused_moe_int4``): int32 codes packed
    along each row's inputs, float16 group scales (w13 in groups of 32, w2 of 16: each
    projection its own), uint8 zero codes (AWQ) or None (zero 8, symmetric GPTQ), through
    ``fused_moe`` and ``fused_experts``, with an ``expert_map`` where declared."""
    from tessellm.backends.reference.moe import route

    e, h, i = 8, 64, 32
    q13, s13, z13 = _int4_experts(e, 2 * i, h, 32, seed=140 + tokens)
    q2, s2, z2 = _int4_experts(e, h, i, 16, seed=141 + tokens)
    g = torch.Generator().manual_seed(142 + tokens)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    dev = target.device
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops(target, dtype)
        if not getattr(ops, "fused_moe_int4", False):
            pytest.skip(f"{target.name}'s fused_moe does not declare fused_moe_int4 (int4 "
                        "experts run the reference loop)")
        xd = x.to(dtype)
        for zeros in ((z13, z2), (None, None)):
            kw = dict(int4=True, w13_zeros=zeros[0], w2_zeros=zeros[1])
            want = fused_moe_reference(xd, logits, q13, q2, 2, "softmax", True, s13, s2, **kw)
            kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
            args = [t.to(dev) for t in (q13, q2, s13, s2)]
            got = ops.fused_moe(xd.to(dev), logits.to(dev), args[0], args[1], 2, "softmax",
                                True, args[2], args[3], **kw_dev)
            assert got.dtype == dtype and got.shape == x.shape
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
            if getattr(ops, "fused_experts", None) is not None:
                weights, ids = route(logits, 2)
                got = ops.fused_experts(xd.to(dev), weights.to(dev), ids.to(dev), *args, **kw_dev)
                torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
        if getattr(ops, "fused_moe_expert_map", False):  # experts 4..7 held here
            expert_map = torch.tensor([-1] * 4 + [0, 1, 2, 3], dtype=torch.int32)
            local = [t[4:] for t in (q13, q2, s13, s2, z13, z2)]
            kw = dict(int4=True, w13_zeros=local[4], w2_zeros=local[5], expert_map=expert_map)
            want = fused_moe_reference(xd, logits, *local[:2], 2, "softmax", True, *local[2:4],
                                       **kw)
            got = ops.fused_moe(xd.to(dev), logits.to(dev), *[t.to(dev) for t in local[:2]], 2,
                                "softmax", True, *[t.to(dev) for t in local[2:4]],
                                **{k: v.to(dev) if isinstance(v, torch.Tensor) else v
                                   for k, v in kw.items()})
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


@pytest.mark.parametrize("tokens", [1, 40])
def test_fused_moe_int4_act_order(target, tokens):
    """GPTQ act-order int4 experts (optional, declared by ``fused_moe_int4_act_order``): keyword
    ``w13_perm`` ``[E, H]`` int32, each expert's own input order of w13, through ``fused_moe``
    and ``fused_experts`` (the reference gathers ``hidden[:, w13_perm[e]]``)."""
    from tessellm.backends.reference.moe import route

    e, h, i = 8, 64, 32
    q13, s13, z13 = _int4_experts(e, 2 * i, h, 32, seed=150 + tokens)
    q2, s2, z2 = _int4_experts(e, h, i, 16, seed=151 + tokens)
    g = torch.Generator().manual_seed(152 + tokens)
    perm = torch.stack([torch.randperm(h, generator=g) for _ in range(e)]).to(torch.int32)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    dev = target.device
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops(target, dtype)
        if not getattr(ops, "fused_moe_int4_act_order", False):
            pytest.skip(f"{target.name}'s fused_moe does not declare fused_moe_int4_act_order "
                        "(GPTQ act-order int4 experts run the reference loop)")
        xd = x.to(dtype)
        kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2, w13_perm=perm)
        want = fused_moe_reference(xd, logits, q13, q2, 2, "softmax", True, s13, s2, **kw)
        kw_dev = {k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        args = [t.to(dev) for t in (q13, q2, s13, s2)]
        got = ops.fused_moe(xd.to(dev), logits.to(dev), args[0], args[1], 2, "softmax", True,
                            args[2], args[3], **kw_dev)
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
        if getattr(ops, "fused_experts", None) is not None:
            weights, ids = route(logits, 2)
            got = ops.fused_experts(xd.to(dev), weights.to(dev), ids.to(dev), *args, **kw_dev)
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))


def _bnb4_experts(e, n, k, seed):
    """Random ``[E, N, K]`` weights quantized to bitsandbytes 4-bit in the contract's layout
    (``reference/moe.py``): ``(codes uint8 [E, N, K/2], absmax float32 [E, N, K/64])``."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 256, (e, n, k // 2), generator=g, dtype=torch.uint8)
    return codes, (torch.rand(e, n, k // 64, generator=g) + 1) / k ** 0.5


@pytest.mark.parametrize("tokens, table", [(1, "fp4"), (9, "nf4"), (40, "nf4")])
def test_fused_moe_bnb4_experts(target, tokens, table):
    """bitsandbytes 4-bit experts (optional, declared by ``fused_moe_bnb4``, plugin API 26):
    uint8 codes two a byte (high nibble first), float32 absmaxes a block of 64 inputs (w2's
    rows 3 blocks: a count that is not a power of two, as Qwen3-30B-A3B's 12; the NF4 / FP4
    table given as ``bnb4_code``), through ``fused_moe`` and ``fused_experts``, with an
    ``expert_map`` where declared."""
    from tessellm.backends.reference.moe import route
    from tessellm.quantization.bnb import FP4_CODE, NF4_CODE

    e, h, i = 8, 64, 192
    q13, a13 = _bnb4_experts(e, 2 * i, h, seed=160 + tokens)
    q2, a2 = _bnb4_experts(e, h, i, seed=161 + tokens)
    code = torch.tensor(NF4_CODE if table == "nf4" else FP4_CODE)
    g = torch.Generator().manual_seed(162 + tokens)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    dev = target.device
    for dtype in (torch.float32, target.low_precision_dtype):
        ops = _moe_ops(target, dtype)
        if not getattr(ops, "fused_moe_bnb4", False):
            pytest.skip(f"{target.name}'s fused_moe does not declare fused_moe_bnb4 (the layer "
                        "dequantizes bnb4 experts and passes them dense)")
        xd = x.to(dtype)
        want = fused_moe_reference(xd, logits, q13, q2, 2, "softmax", True, a13, a2,
                                   bnb4_code=code)
        args = [t.to(dev) for t in (q13, q2, a13, a2)]
        got = ops.fused_moe(xd.to(dev), logits.to(dev), args[0], args[1], 2, "softmax", True,
                            args[2], args[3], bnb4_code=code.to(dev))
        assert got.dtype == dtype and got.shape == x.shape
        torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
        if getattr(ops, "fused_experts", None) is not None:
            weights, ids = route(logits, 2)
            got = ops.fused_experts(xd.to(dev), weights.to(dev), ids.to(dev), *args,
                                    bnb4_code=code.to(dev))
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
        if getattr(ops, "fused_moe_expert_map", False):  # experts 4..7 held here
            expert_map = torch.tensor([-1] * 4 + [0, 1, 2, 3], dtype=torch.int32)
            local = [t[4:] for t in (q13, q2, a13, a2)]
            want = fused_moe_reference(xd, logits, *local[:2], 2, "softmax", True, *local[2:],
                                       bnb4_code=code, expert_map=expert_map)
            got = ops.fused_moe(xd.to(dev), logits.to(dev), *[t.to(dev) for t in local[:2]], 2,
                                "softmax", True, *[t.to(dev) for t in local[2:]],
                                bnb4_code=code.to(dev), expert_map=expert_map.to(dev))
            torch.testing.assert_close(got.cpu(), want, **_moe_tolerance(dtype))
