"""The cpu kernel's torch path for eager decodes (without the C kernel): decode groups: decodes sorted by context length and cut into groups
of at most ``DECODE_GROUP_TOKENS`` padded tokens attend exactly like the reference, whatever
the group budget (one group, several, one sequence each), with prefill chunks in the same step."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.cpu import attention as cpu_attention
from tessellm.backends.cpu.attention import CpuAttentionKernel, _decode_groups
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.harness import make_paged_step

BLOCK = 4


def test_groups_cover_every_row_once_within_budget(monkeypatch):
    monkeypatch.setattr(cpu_attention, "DECODE_GROUP_TOKENS", 64)
    lens = [30, 3, 61, 17, 18, 5, 44, 100, 9, 2]
    groups = _decode_groups(lens, BLOCK)
    rows = [r for g, _ in groups for r in g]
    assert sorted(rows) == list(range(len(lens)))
    for g, longest in groups:
        assert longest == max(lens[r] for r in g)
        width = -(-longest // BLOCK) * BLOCK
        assert len(g) == 1 or len(g) * width <= 64  # a row longer than the budget goes alone
    assert len(groups) > 2
    assert _decode_groups([5, 6, 7], BLOCK) == [(None, 7)]  # 3 x 8 padded tokens: one group, in order


@pytest.mark.parametrize("budget,window", [(10_000, None), (48, None), (1, None), (48, 7)])
def test_grouped_decodes_match_reference(monkeypatch, budget, window):
    monkeypatch.setattr(cpu_attention, "DECODE_GROUP_TOKENS", budget)
    ctx = [13, 2, 40, 7, 25, 25, 1, 33, 9]  # decodes first, then two prefill chunks
    step = make_paged_step([1] * 7 + [5, 3], ctx, num_kv_heads=2, group=3, head_size=16,
                           block_size=BLOCK, dtype=torch.float32, device="cpu", window=window, seed=5)
    kernel = CpuAttentionKernel(AttentionSpec(6, 2, 16, torch.float32, BLOCK, "auto", window))
    kernel.native = None  # the torch path (the C kernel's tests: test_cpu_native.py)
    md = kernel.build_metadata(step.batch)
    assert len(md.decode_groups) == {10_000: 1, 48: 5, 1: 7}[budget]  # seq lens 14 3 41 8 26 26 2
    out = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale)
    torch.testing.assert_close(out, step.ref_out, rtol=1e-5, atol=1e-5)
    assert torch.equal(step.k_cache, step.ref_k_cache) and torch.equal(step.v_cache, step.ref_v_cache)
