"""Graph capture correctness: a captured decode-like step replays exactly what eager runs
compute, for every bucket, with fresh data each replay (stale static buffers show up here)."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.spec import AttentionSpec, GraphRunner, GraphSpec, OpsSpec
from tessellm.backends.spec import AttentionBatch
from tessellm.testing.harness import tolerance

HIDDEN, INTER, HEADS, KV_HEADS, HEAD, BLOCK, MAX_BLOCKS = 64, 96, 4, 2, 16, 16, 4
SIZES = (1, 2, 4, 8)


def _runner(target):
    target.skip_if_emulated("graph capture")
    spec = GraphSpec(max_num_seqs=SIZES[-1], capture_sizes=SIZES, dtype=torch.float32)
    runner = target.registry.graph_runner(target.backend, spec)
    if runner is None:
        pytest.skip(f"{target.name} has no graph runner (eager only)")
    assert isinstance(runner, GraphRunner)
    return runner


class _Step:
    """RMSNorm -> rotary q/k -> (paged attention if the kernel is capture-safe) -> SiLU MLP."""

    def __init__(self, target):
        dev, f32 = target.device, torch.float32
        g = torch.Generator().manual_seed(0)
        rand = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dev)  # noqa: E731
        self.ops = target.registry.fused_ops(target.backend, OpsSpec(f32))
        if self.ops is None:
            from tessellm.backends.reference.ops import ReferenceOps

            self.ops = ReferenceOps()
        self.norm_w, self.w_qkv = rand(HIDDEN), rand((HEADS + 2 * KV_HEADS) * HEAD, HIDDEN)
        self.w_up, self.w_down = rand(2 * INTER, HIDDEN), rand(HIDDEN, INTER)
        inv = 1.0 / (10000 ** (torch.arange(0, HEAD, 2).float() / HEAD))
        freqs = torch.arange(BLOCK * MAX_BLOCKS).float()[:, None] * inv[None, :]
        self.cos_sin = torch.cat([freqs.cos(), freqs.sin()], -1).to(dev)
        spec = AttentionSpec(num_heads=HEADS, num_kv_heads=KV_HEADS, head_size=HEAD, dtype=f32,
                             block_size=BLOCK, max_model_len=BLOCK * MAX_BLOCKS,
                             max_num_seqs=SIZES[-1])
        kernel = target.registry.attention_kernel(target.backend, spec)
        self.kernel = kernel if getattr(kernel, "supports_graph_capture", False) else None
        num_blocks = SIZES[-1] * MAX_BLOCKS
        self.k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, HEAD, device=dev)
        self.v_cache = torch.zeros_like(self.k_cache)
        self.device = dev

    def __call__(self, x, positions, slots, seq_lens, block_tables):
        h = self.ops.rms_norm(x, self.norm_w, 1e-6)
        qkv = h @ self.w_qkv.t()
        q, k, v = qkv.split([HEADS * HEAD, KV_HEADS * HEAD, KV_HEADS * HEAD], dim=-1)
        q, k = self.ops.rotary_embedding(positions, q.contiguous(), k.contiguous(), self.cos_sin, HEAD)
        out = x + self.ops.silu_and_mul(h @ self.w_up.t()) @ self.w_down.t()
        if self.kernel is not None:
            n = x.shape[0]
            batch = AttentionBatch(
                num_tokens=n, num_seqs=n, num_decodes=n,
                query_start_loc=torch.arange(n + 1, dtype=torch.int32, device=x.device),
                seq_lens=seq_lens, block_tables=block_tables, slot_mapping=slots,
                max_query_len=1, max_seq_len=BLOCK * MAX_BLOCKS,
                query_start_loc_host=list(range(n + 1)), seq_lens_host=[BLOCK * MAX_BLOCKS] * n)
            md = self.kernel.build_metadata(batch)
            attn = self.kernel.forward(q.view(n, HEADS, HEAD), k.view(n, KV_HEADS, HEAD),
                                       v.contiguous().view(n, KV_HEADS, HEAD), self.k_cache,
                                       self.v_cache, md, HEAD ** -0.5)
            out = out + attn.reshape(n, -1)[:, :HIDDEN]
        else:
            out = out + q[:, :HIDDEN] + k.repeat(1, 4)[:, :HIDDEN]
        return out

    def inputs(self, size: int, real: int, seed: int):
        """Padded inputs: ``real`` decode rows, then padding (slot -1, length 0)."""
        g = torch.Generator().manual_seed(seed)
        x = torch.zeros(size, HIDDEN)
        x[:real] = torch.randn(real, HIDDEN, generator=g)
        lens = torch.zeros(size, dtype=torch.int32)
        lens[:real] = torch.randint(1, BLOCK * MAX_BLOCKS, (real,), generator=g, dtype=torch.int32)
        positions = (lens - 1).clamp(min=0).long()
        tables = torch.arange(size * MAX_BLOCKS, dtype=torch.int32).view(size, MAX_BLOCKS)
        slots = torch.full((size,), -1, dtype=torch.int64)
        slots[:real] = (tables[:real, 0].long() * BLOCK + positions[:real] % BLOCK)
        dev = self.device
        return (x.to(dev), positions.to(dev), slots.to(dev), lens.to(dev), tables.to(dev))


def test_graph_runner_buckets(target):
    runner = _runner(target)
    assert tuple(runner.capture_sizes) == SIZES
    assert [runner.padded_size(n) for n in (1, 2, 3, 5, 8)] == [1, 2, 4, 8, 8]
    assert runner.padded_size(SIZES[-1] + 1) is None


def test_graph_replay_matches_eager(target):
    runner = _runner(target)
    step = _Step(target)
    runner.capture(step, lambda size: step.inputs(size, size, seed=size))
    for trial, real in enumerate([1, 3, 4, 7, 8, 2, 8]):
        size = runner.padded_size(real)
        inputs = step.inputs(size, real, seed=100 + trial)
        got = runner.run(inputs)[:real].clone().cpu()
        want = step(*[t.clone() for t in inputs])[:real].cpu()
        torch.testing.assert_close(got, want, **tolerance(torch.float32))
