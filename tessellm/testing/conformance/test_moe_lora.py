"""The backend's MoE experts with per-token LoRA adapters (``LoRAOps.fused_experts_lora``,
plugin API 14; ``ExpertLoRA`` in backends/spec.py) against an oracle built here from the
reference fused MoE alone: each slot's adapter merged into its copy of the experts' weights
(``w + scaling * B A`` per expert and part), each token run through its slot's merged experts.
Mixed slots (-1 rows, an unused slot, ranks zero-padded), one token to a prefill-sized batch,
expert parallelism (``expert_map``), float32 and the backend's low-precision dtype. Ops without
``fused_experts_lora`` are checked through the reference the engine then runs."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.moe import fused_experts_reference, route
from tessellm.backends.spec import ExpertLoRA, LoRAOpsSpec
from tessellm.testing.harness import seed_of

SLOTS, RANK, HIDDEN, INTER, EXPERTS, TOP_K = 4, 16, 64, 32, 8, 2


def _op(target, dtype):
    from tessellm.backends.reference.moe_lora import fused_experts_lora_reference

    ops = target.registry.lora_ops(target.backend, LoRAOpsSpec(dtype, SLOTS, RANK, target.device))
    return getattr(ops, "fused_experts_lora", None) or fused_experts_lora_reference


def _adapters(ranks, g):
    """Slot s has rank ranks[s] (0: empty) on every expert, gate and up with their own A."""
    w13_a = torch.zeros(SLOTS, EXPERTS, 2 * RANK, HIDDEN)
    w13_b = torch.zeros(SLOTS, EXPERTS, 2 * INTER, RANK)
    w2_a = torch.zeros(SLOTS, EXPERTS, RANK, INTER)
    w2_b = torch.zeros(SLOTS, EXPERTS, HIDDEN, RANK)
    for s, r in enumerate(ranks):
        for part in range(2):
            w13_a[s, :, part * RANK:part * RANK + r] = torch.randn(EXPERTS, r, HIDDEN, generator=g) / 8
            w13_b[s, :, part * INTER:(part + 1) * INTER, :r] = torch.randn(EXPERTS, INTER, r, generator=g) / 4
        w2_a[s, :, :r] = torch.randn(EXPERTS, r, INTER, generator=g) / 6
        w2_b[s, :, :, :r] = torch.randn(EXPERTS, HIDDEN, r, generator=g) / 4
    return ExpertLoRA(w13_a, w13_b, w2_a, w2_b, torch.tensor([2.0, 0.5, 1.0, 1.0]))


def _merged_oracle(hidden, weights, ids, w13, w2, slots, lora):
    """Each token through its slot's experts with the adapter merged (float64 weights)."""
    out = fused_experts_reference(hidden.double(), weights, ids, w13.double(), w2.double())
    for s in range(SLOTS):
        rows = torch.nonzero(slots == s).squeeze(1)
        if rows.numel() == 0:
            continue
        sc = float(lora.scaling[s])
        a, b = lora.w13_a[s].double(), lora.w13_b[s].double()
        delta13 = torch.cat([b[:, :INTER] @ a[:, :RANK], b[:, INTER:] @ a[:, RANK:]], dim=1)
        m13 = w13.double() + sc * delta13
        m2 = w2.double() + sc * (lora.w2_b[s].double() @ lora.w2_a[s].double())
        out[rows] = fused_experts_reference(hidden[rows].double(), weights[rows], ids[rows], m13, m2)
    return out


def _tol(dtype):
    return dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=5e-2)


def _case(tokens, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, HIDDEN, generator=g)
    w13 = torch.randn(EXPERTS, 2 * INTER, HIDDEN, generator=g) / 8
    w2 = torch.randn(EXPERTS, HIDDEN, INTER, generator=g) / 6
    weights, ids = route(torch.randn(tokens, EXPERTS, generator=g), TOP_K)
    slots = torch.randint(-1, SLOTS - 1, (tokens,), generator=g, dtype=torch.int32)  # 3 unused
    return hidden, weights, ids, w13, w2, slots, _adapters((8, 16, 4, 0), g)


def _to(lora, dev, dtype):
    return ExpertLoRA(*(getattr(lora, f).to(dev, dtype) for f in ("w13_a", "w13_b", "w2_a", "w2_b")),
                      lora.scaling.to(dev))


@pytest.mark.parametrize("tokens", [1, 7, 40])
def test_fused_experts_lora(target, tokens):
    hidden, weights, ids, w13, w2, slots, lora = _case(tokens, seed_of("moe-lora", tokens))
    want = _merged_oracle(hidden, weights, ids, w13, w2, slots, lora)
    base = fused_experts_reference(hidden, weights, ids, w13, w2)
    assert (want - base.double()).abs().max() > 1e-2  # the adapters change the output
    dev = target.device
    for dtype in (torch.float32, target.low_precision_dtype):
        got = _op(target, dtype)(hidden.to(dev, dtype), weights.to(dev), ids.to(dev),
                                 w13.to(dev, dtype), w2.to(dev, dtype), slots.to(dev),
                                 _to(lora, dev, dtype))
        assert got.dtype == dtype and tuple(got.shape) == (tokens, HIDDEN)
        torch.testing.assert_close(got.cpu().double(), want, **_tol(dtype), msg=f"{dtype}")
        none = slots < 0  # rows without an adapter: the base experts
        torch.testing.assert_close(got.cpu()[none].double(), base[none].double(), **_tol(dtype))


def test_fused_experts_lora_expert_map(target):
    """Expert parallelism: this rank holds experts 4..7 (and their slots); the others' pairs
    add nothing, so the two ranks' outputs sum to the whole layer's."""
    hidden, weights, ids, w13, w2, slots, lora = _case(12, seed_of("moe-lora-ep"))
    want = _merged_oracle(hidden, weights, ids, w13, w2, slots, lora)
    dev, half = target.device, EXPERTS // 2
    op = _op(target, torch.float32)
    total = torch.zeros(12, HIDDEN, dtype=torch.float64)
    for rank in range(2):
        held = slice(rank * half, (rank + 1) * half)
        expert_map = torch.full((EXPERTS,), -1, dtype=torch.int32)
        expert_map[held] = torch.arange(half, dtype=torch.int32)
        part = ExpertLoRA(*(getattr(lora, f)[:, held].contiguous()
                            for f in ("w13_a", "w13_b", "w2_a", "w2_b")), lora.scaling)
        got = op(hidden.to(dev), weights.to(dev), ids.to(dev), w13[held].to(dev), w2[held].to(dev),
                 slots.to(dev), _to(part, dev, torch.float32), expert_map=expert_map.to(dev))
        total += got.cpu().double()
    torch.testing.assert_close(total, want, **_tol(torch.float32))
