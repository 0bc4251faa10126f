"""The tpu backend's MoE experts with per-token LoRA in static shapes (``tpu/xla_moe.py``):
both forms (gathered: ``T * k < E``; dense otherwise) against the oracle
``reference/moe_lora.fused_experts_lora_reference``, with tokens without an adapter, several
slots, gpt-oss's clamped SwiGLU with biases, and expert parallelism's ``expert_map``."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.moe import ExpertActivation
from tessellm.backends.reference.moe_lora import fused_experts_lora_reference
from tessellm.backends.spec import ExpertLoRA
from tessellm.backends.tpu.xla_moe import static_fused_experts_lora


def _case(tokens, experts, top_k, seed, hidden=32, inter=16, rank=4, slots=3, parts=2):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, parts * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.rand(tokens, top_k, generator=g)
    lora = ExpertLoRA(
        w13_a=torch.randn(slots, experts, parts * rank, hidden, generator=g) * 0.3,
        w13_b=torch.randn(slots, experts, parts * inter, rank, generator=g) * 0.3,
        w2_a=torch.randn(slots, experts, rank, inter, generator=g) * 0.3,
        w2_b=torch.randn(slots, experts, hidden, rank, generator=g) * 0.3,
        scaling=torch.tensor([0.5, 2.0, 1.0][:slots]))
    token_slots = torch.randint(-1, slots, (tokens,), generator=g, dtype=torch.int32)
    token_slots[0], token_slots[-1] = -1, slots - 1  # one without an adapter, the last slot
    return x, weights, ids.to(torch.int32), w13, w2, token_slots, lora


@pytest.mark.parametrize("tokens,experts,top_k", [(2, 8, 2), (9, 4, 2), (5, 6, 3)],
                         ids=["gathered", "dense", "dense-k3"])
def test_static_moe_lora_matches_the_reference(tokens, experts, top_k):
    args = _case(tokens, experts, top_k, seed=tokens + experts)
    want = fused_experts_lora_reference(*args)
    got = static_fused_experts_lora(*args)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_lora = fused_experts_lora_reference(*args[:5], torch.full_like(args[5], -1), args[6])
    assert (want - no_lora).abs().max() > 1e-2  # the adapters change the output


@pytest.mark.parametrize("tokens", [1, 7], ids=["gathered", "dense"])
def test_static_moe_lora_swiglu_biases_and_expert_map(tokens):
    """gpt-oss's clamped SwiGLU with expert biases, and this rank holding experts 2..5 of 8."""
    x, weights, ids, w13, w2, token_slots, lora = _case(tokens, 8, 2, seed=11)
    g = torch.Generator().manual_seed(5)
    local = slice(2, 6)
    expert_map = torch.full((8,), -1, dtype=torch.int32)
    expert_map[local] = torch.arange(4, dtype=torch.int32)
    lora = ExpertLoRA(lora.w13_a[:, local], lora.w13_b[:, local], lora.w2_a[:, local],
                      lora.w2_b[:, local], lora.scaling)
    kw = dict(activation=ExpertActivation("swiglu_oai", alpha=1.702, limit=7.0),
              w13_bias=torch.randn(4, w13.shape[1], generator=g) * 0.1,
              w2_bias=torch.randn(4, w2.shape[1], generator=g) * 0.1, expert_map=expert_map)
    args = (x, weights, ids, w13[local], w2[local], token_slots, lora)
    want = fused_experts_lora_reference(*args, **kw)
    got = static_fused_experts_lora(*args, **kw)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("tokens", [1, 6], ids=["gathered", "dense"])
def test_static_moe_lora_ungated_relu2(tokens):
    """Nemotron-H's ungated experts: ``w13`` the up rows alone, one part of LoRA A / B."""
    args = _case(tokens, 4, 2, seed=3, parts=1)
    kw = dict(activation=ExpertActivation("relu2"))
    torch.testing.assert_close(static_fused_experts_lora(*args, **kw),
                               fused_experts_lora_reference(*args, **kw), rtol=1e-5, atol=1e-5)
