"""The tensor-core grouped GEMM of AWQ / GPTQ int4 MoE experts (``kernels/moe/int4_tc_moe.py``)
through ``fused_moe_triton`` against the reference op (``fused_experts_reference``, float32):
zero codes or 8, SiLU-and-mul in GEMM 1's epilogue or apart, GPTQ act order (``w13_perm``),
groups of 128 or one per channel, 16-bit activations; and with TESSELLM_MOE_INT4_TC=0 the
dequantized-tile kernel as before. Triton's interpreter on a CPU (tiny sizes), the GPU where
there is one (also Qwen3-30B-A3B-sized experts at 16 / 64 / 256 tokens)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.moe import fused_experts_reference, route  # noqa: E402
from tessellm.kernels.moe import fused_moe_triton  # noqa: E402
from tessellm.kernels.moe import int4_tc_moe as tm  # noqa: E402
from tests.quantization.int4_checkpoint import random_int4_experts  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")


def _case(tokens, e, h, i, group13, group2, zeros, act_order, seed):
    q13, s13, z13 = random_int4_experts(e, 2 * i, h, group13, seed)
    q2, s2, z2 = random_int4_experts(e, h, i, group2, seed + 1)
    if not zeros:
        z13 = z2 = None
    g = torch.Generator().manual_seed(seed + 2)
    x, logits = torch.randn(tokens, h, generator=g), torch.randn(tokens, e, generator=g)
    weights, ids = route(logits, 2)
    perm = (torch.stack([torch.randperm(h, generator=g) for _ in range(e)]).to(torch.int32)
            if act_order else None)
    kw = dict(int4=True, w13_zeros=z13, w2_zeros=z2)
    want = fused_experts_reference(x, weights, ids, q13, q2, s13, s2, w13_perm=perm, **kw)
    to = (lambda t: None if t is None else t.to(DEV))  # noqa: E731
    args = [to(t) for t in (x, weights, ids.to(torch.int32), q13, q2, s13, s2)]
    kw = dict(int4=True, w13_zeros=to(z13), w2_zeros=to(z2), w13_perm=to(perm))
    return args, kw, want


def test_applies_by_k_and_group(monkeypatch):
    assert tm.moe_int4_tc_applies(256, 128) and tm.moe_int4_tc_applies(384, 384)
    assert not tm.moe_int4_tc_applies(256, 64) and not tm.moe_int4_tc_applies(192, 192)
    monkeypatch.setenv("TESSELLM_MOE_INT4_TC", "0")
    assert not tm.moe_int4_tc_applies(256, 128)


def test_slab_order():
    order = tm.slab_order(256, "cpu")
    b, i, j = 1, 3, 5
    assert int(order[128 * b + 16 * i + j]) == 128 * b + 8 * j + i
    assert torch.equal(order.sort().values, torch.arange(256))


@pytest.mark.parametrize("tokens, fuse, zeros, act_order, group13", [
    (5, True, True, False, 128), (9, False, False, False, 256), (6, True, True, True, 128),
    (20, False, True, True, 256)])
@pytest.mark.parametrize("tc", ["1", "0"])
def test_int4_tc_moe_matches_reference(tokens, fuse, zeros, act_order, group13, tc, monkeypatch):
    """float32: the tc kernel (codes exact, scales per block) and, off, the tile kernel equal
    the reference to reassociation (group 256 = K: one group per channel for GEMM 1)."""
    monkeypatch.setenv("TESSELLM_MOE_INT4_TC", tc)
    args, kw, want = _case(tokens, 4, 256, 128, group13, 128, zeros, act_order, seed=tokens)
    tiles = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SILU_MUL=fuse)
    got = fused_moe_triton(*args, tiles, **kw)
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_int4_tc_moe_half_activations(dtype):
    """16-bit activations: codes widened by bits (fp16 1024 + q, bf16 128 + q); the
    reference rounds each dequantized weight to the dtype, this kernel keeps codes exact."""
    args, kw, want = _case(7, 4, 256, 128, 128, 128, True, False, seed=3)
    args[0] = args[0].to(dtype)
    got = fused_moe_triton(*args, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=64, SILU_MUL=True), **kw)
    assert got.dtype == dtype
    err = ((got.float().cpu() - want).abs().max() / want.abs().max()).item()
    # bf16: the interpreter truncates where a GPU rounds; the tile kernel gives 2.7e-2 there
    assert err < (2e-3 if dtype == torch.float16 else 1.5e-2 if ON_GPU else 2.5e-2), err


def test_int4_tc_block_m_rule_reads_pairs_per_global_expert_with_expert_parallelism(monkeypatch):
    """With ``expert_map`` (2 of 8 experts on this rank) the BLOCK_M rule gets every pair over
    the global experts (5 an expert: 16), not over the local ones (20 an expert: 32, though
    this rank's experts get about a quarter of the pairs); the result equals the reference's."""
    import importlib

    fm = importlib.import_module("tessellm.kernels.moe.fused_moe")  # the package's name is the op
    monkeypatch.setenv("TESSELLM_MOE_INT4_TC", "1")
    monkeypatch.setenv("TESSELLM_MOE_INT4_DEQUANT_TOKENS", "0")
    (x, weights, ids, q13, q2, s13, s2), kw, _ = _case(20, 8, 256, 128, 128, 128, True, False, seed=4)
    expert_map = torch.full((8,), -1, dtype=torch.int32, device=DEV)
    expert_map[torch.tensor([2, 5])] = torch.tensor([0, 1], dtype=torch.int32, device=DEV)
    held = [2, 5]
    local = [t[held] for t in (q13, q2, s13, s2, kw["w13_zeros"], kw["w2_zeros"])]
    seen = []
    rule = fm.moe_int4_tc_block_m

    def spy(pairs, num_experts):
        seen.append((pairs, num_experts, rule(pairs, num_experts)))
        return seen[-1][2]

    monkeypatch.setattr(fm, "moe_int4_tc_block_m", spy)
    got = fused_moe_triton(x, weights, ids, *local[:4], int4=True, w13_zeros=local[4],
                           w2_zeros=local[5], expert_map=expert_map)
    assert seen == [(40, 8, 16)]
    want = fused_experts_reference(*(t.cpu() for t in (x, weights, ids.long(), *local[:4])),
                                   int4=True, w13_zeros=local[4].cpu(), w2_zeros=local[5].cpu(),
                                   expert_map=expert_map.cpu())
    torch.testing.assert_close(got.cpu(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not ON_GPU, reason="Qwen3-30B-A3B-sized experts need a GPU")
@pytest.mark.parametrize("tokens", [16, 64, 256])
def test_int4_tc_moe_qwen3_shapes_on_gpu(tokens):
    """Hidden 2048, intermediate 768, 16 experts (of 128), groups of 128, bf16, the engine's
    own tiles (fused SiLU at 16, apart at 256); against the reference in float32."""
    args, kw, want = _case(tokens, 16, 2048, 768, 128, 128, True, False, seed=tokens)
    args[0] = args[0].to(torch.bfloat16)
    got = fused_moe_triton(*args, **kw).float().cpu()
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 2e-2, err
