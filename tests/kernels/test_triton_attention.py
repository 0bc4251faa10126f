"""Triton paged attention against the pure-torch reference (``backends/reference/attention.py``).

Runs on a GPU at realistic sizes, or through Triton's interpreter on the CPU at tiny sizes (see
conftest.py). Every check draws fresh random inputs, poisons outputs and workspace with NaN
first, and asserts that every element was written.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from dataclasses import dataclass

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel, decode_attention, decode_workspace_numel, reshape_and_cache)
from tessellm.kernels.fused_ops import TritonOps  # noqa: E402
from tessellm.backends.reference.attention import paged_attention, write_kv_cache  # noqa: E402
from tessellm.backends.reference.ops import ReferenceOps  # noqa: E402
from tessellm.backends.spec import AttentionKernel, AttentionSpec  # noqa: E402
from tessellm.backends.spec import AttentionBatch  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEVICE = torch.device("cuda" if ON_GPU else "cpu")
NUM_KV_HEADS = 4 if ON_GPU else 2
F32, BF16, F16 = torch.float32, torch.bfloat16, torch.float16

# Decodes first (query length 1), then prefill chunks. Context lengths (already cached tokens)
# are mostly not multiples of the block size; "context > 0 with several queries" is a chunked
# prefill or a prefix-cache hit.
if ON_GPU:
    MIXED = dict(query_lens=[1, 1, 1, 1, 1, 200, 37, 5, 1000, 64],
                 ctx_lens=[0, 17, 300, 1023, 2100, 0, 411, 1500, 0, 77])
else:
    MIXED = dict(query_lens=[1, 1, 1, 9, 20, 3], ctx_lens=[0, 17, 40, 0, 13, 50])


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _tol(dtype) -> dict:
    return {F32: dict(atol=1e-4, rtol=1e-4), F16: dict(atol=5e-3, rtol=5e-3),
            BF16: dict(atol=1.6e-2, rtol=1.6e-2)}[dtype]


@dataclass
class Step:
    """One step's inputs, plus the reference's caches and output for it."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    batch: AttentionBatch
    ref_out: torch.Tensor
    ref_k_cache: torch.Tensor
    ref_v_cache: torch.Tensor
    scale: float


def make_step(query_lens, ctx_lens, *, group, head_size, block_size, dtype, window=None,
              seed=0) -> Step:
    """Random caches, shuffled block tables, this step's q/k/v and the reference result.

    Sequence s owns blocks ``block_tables[s, :cdiv(seq_len, block_size)]``, drawn without
    replacement from a shuffled pool larger than needed, so neighbours are not adjacent.
    """
    gen = torch.Generator().manual_seed(seed)
    num_heads = NUM_KV_HEADS * group
    seq_lens = [c + q for c, q in zip(ctx_lens, query_lens)]
    nblocks = [math.ceil(s / block_size) for s in seq_lens]
    pool = torch.randperm(sum(nblocks) + 3, generator=gen)
    block_tables = torch.zeros(len(seq_lens), max(nblocks) + 1, dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblocks):
        block_tables[s, :n] = pool[used:used + n]
        used += n
    cache_shape = (len(pool), block_size, NUM_KV_HEADS, head_size)
    k_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    v_cache = torch.randn(cache_shape, generator=gen).to(dtype)
    slots = [int(block_tables[s, p // block_size]) * block_size + p % block_size
             for s in range(len(seq_lens)) for p in range(ctx_lens[s], seq_lens[s])]
    num_tokens = len(slots)
    q = (1.5 * torch.randn(num_tokens, num_heads, head_size, generator=gen)).to(dtype)
    k = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=gen).to(dtype)
    v = torch.randn(num_tokens, NUM_KV_HEADS, head_size, generator=gen).to(dtype)
    qsl = [0]
    for n in query_lens:
        qsl.append(qsl[-1] + n)
    num_decodes = 0
    while num_decodes < len(query_lens) and query_lens[num_decodes] == 1:
        num_decodes += 1
    dev = lambda t: t.to(DEVICE)  # noqa: E731
    batch = AttentionBatch(
        num_tokens=num_tokens, num_seqs=len(seq_lens), num_decodes=num_decodes,
        query_start_loc=dev(torch.tensor(qsl, dtype=torch.int32)),
        seq_lens=dev(torch.tensor(seq_lens, dtype=torch.int32)),
        block_tables=dev(block_tables), slot_mapping=dev(torch.tensor(slots, dtype=torch.int64)),
        max_query_len=max(query_lens), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens)
    q, k, v, k_cache, v_cache = map(dev, (q, k, v, k_cache, v_cache))
    scale = head_size ** -0.5
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, ref_k, ref_v, batch.slot_mapping)
    ref = paged_attention(q, ref_k, ref_v, batch.query_start_loc, batch.seq_lens,
                          batch.block_tables, scale, window)
    return Step(q, k, v, k_cache, v_cache, batch, ref, ref_k, ref_v, scale)


def assert_matches(out: torch.Tensor, ref: torch.Tensor, dtype) -> None:
    assert not torch.isnan(out).any(), "some output elements were never written (NaN poison)"
    rel = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
    assert rel < {F32: 1e-5, F16: 2e-3, BF16: 1e-2}[dtype], f"relative error {rel:.2e}"
    torch.testing.assert_close(out, ref, **_tol(dtype))


def run_kernel(step: Step, *, group, head_size, block_size, dtype, window=None,
               max_model_len=4096) -> torch.Tensor:
    spec = AttentionSpec(num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS,
                         head_size=head_size, dtype=dtype, block_size=block_size,
                         sliding_window=window)
    kernel = TritonAttentionKernel(spec, max_model_len=max_model_len, max_num_seqs=16)
    assert isinstance(kernel, AttentionKernel)
    out = torch.full_like(step.q, float("nan"))
    result = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                            kernel.build_metadata(step.batch), step.scale, out=out)
    assert result is out
    return out


# ---------------------------------------------------------------------------------------------
# reshape_and_cache
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [BF16, F32])
@pytest.mark.parametrize("block_size,head_size", [(16, 64), (32, 128)])
def test_reshape_and_cache_writes_slots_and_skips_minus_one(dtype, block_size, head_size):
    gen = torch.Generator().manual_seed(_seed("rc", dtype, block_size, head_size))
    num_blocks, num_tokens = 7, 40
    # k, v as strided views into one fused qkv projection, like the model produces them.
    qkv = torch.randn(num_tokens, 3 * NUM_KV_HEADS * head_size, generator=gen).to(dtype)
    k = qkv[:, NUM_KV_HEADS * head_size:2 * NUM_KV_HEADS * head_size].view(
        num_tokens, NUM_KV_HEADS, head_size)
    v = qkv[:, 2 * NUM_KV_HEADS * head_size:].view(num_tokens, NUM_KV_HEADS, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens]
    slots[::5] = -1
    shape = (num_blocks, block_size, NUM_KV_HEADS, head_size)
    k_cache = torch.randn(shape, generator=gen).to(dtype)
    v_cache = torch.randn(shape, generator=gen).to(dtype)
    k, v, k_cache, v_cache, slots = (t.to(DEVICE) for t in (k, v, k_cache, v_cache, slots))
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache(k, v, ref_k, ref_v, slots)
    reshape_and_cache(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)


# ---------------------------------------------------------------------------------------------
# The whole kernel: mixed decode + prefill batches
# ---------------------------------------------------------------------------------------------

# (dtype, block_size, head_size, group, sliding_window)
if ON_GPU:
    FORWARD_CASES = (
        [(BF16, 16, hs, g, None) for hs in (64, 128, 256) for g in (1, 4, 8)]
        + [(BF16, 32, 128, 4, None), (BF16, 32, 256, 8, None),
           (F16, 32, 128, 4, None), (F16, 16, 64, 8, None),
           (F32, 16, 64, 1, None), (F32, 32, 128, 4, None), (F32, 16, 256, 8, None),
           (BF16, 16, 128, 4, 256), (BF16, 32, 128, 8, 100), (F32, 16, 64, 4, 33)])
else:
    FORWARD_CASES = [(F32, 16, 64, 1, None), (BF16, 16, 128, 4, None), (F16, 32, 64, 8, None),
                     (F32, 32, 128, 4, 24), (BF16, 16, 64, 8, 16)]


@pytest.mark.parametrize("dtype,block_size,head_size,group,window", FORWARD_CASES)
def test_mixed_batch_matches_reference(dtype, block_size, head_size, group, window):
    cfg = dict(group=group, head_size=head_size, block_size=block_size, dtype=dtype,
               window=window)
    step = make_step(**MIXED, **cfg, seed=_seed("mixed", dtype, block_size, head_size, group,
                                                  window))
    out = run_kernel(step, **cfg)
    assert torch.equal(step.k_cache, step.ref_k_cache)
    assert torch.equal(step.v_cache, step.ref_v_cache)
    assert_matches(out, step.ref_out, dtype)


@pytest.mark.parametrize("kind", ["decode_only", "prefill_only", "prefix_hit"])
def test_uniform_batches_match_reference(kind):
    big = 8 if ON_GPU else 1
    lens = {
        "decode_only": ([1] * 5, [3 * big, 16 * big, 31, 100 * big, 0]),
        "prefill_only": ([13 * big, 1, 30], [0, 0, 0]),  # a 1-token prompt is a prefill here
        # whole prompts already cached but the last few tokens (prefix-cache hit)
        "prefix_hit": ([2, 5, 1 + big], [64 * big, 47 * big, 33]),
    }[kind]
    if kind != "decode_only":
        lens = ([2] + lens[0], [1] + lens[1])  # a leading non-decode keeps num_decodes at 0
    cfg = dict(group=4, head_size=64, block_size=16, dtype=BF16)
    step = make_step(*lens, **cfg, seed=_seed(kind))
    assert_matches(run_kernel(step, **cfg), step.ref_out, BF16)


def _positions(batch: AttentionBatch) -> torch.Tensor:
    """Each token's absolute position: query i of sequence s sits at ctx_len(s) + i."""
    qsl, lens = batch.query_start_loc_host, batch.seq_lens_host
    pos = [p for s, n in enumerate(lens) for p in range(n - (qsl[s + 1] - qsl[s]), n)]
    return torch.tensor(pos, dtype=torch.int64, device=DEVICE)


@pytest.mark.parametrize("dtype,block_size,head_size,group",
                         [(F32, 16, 64, 4), (BF16, 32, 128, 8), (F16, 16, 64, 1)])
def test_forward_fuses_rotary_like_rotate_then_forward(dtype, block_size, head_size, group):
    """``fuses_rotary``: forward given unrotated q, k and the positions does what rotating
    first (``TritonOps``) then the plain forward does, bit for bit: prefill chunks read the
    rotated keys back from the cache, decodes too. And it matches the reference backend."""
    cfg = dict(group=group, head_size=head_size, block_size=block_size, dtype=dtype)
    step = make_step(**MIXED, **cfg, seed=_seed("fused-rotary", dtype, block_size, head_size))
    positions = _positions(step.batch)
    max_pos = int(step.batch.max_seq_len) + 5
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    cos_sin = torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)
    spec = AttentionSpec(num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS,
                         head_size=head_size, dtype=dtype, block_size=block_size)
    # a short max_model_len caps the decode splits (fewer interpreted programs on the CPU)
    kernel = TritonAttentionKernel(spec, max_model_len=4096 if ON_GPU else 256, max_num_seqs=16)
    assert kernel.fuses_rotary
    md = kernel.build_metadata(step.batch)

    q_rot, k_rot = step.q.clone(), step.k.clone()
    TritonOps().rotary_embedding(positions, q_rot, k_rot, cos_sin, head_size)
    k_sep, v_sep = step.k_cache.clone(), step.v_cache.clone()
    want = kernel.forward(q_rot, k_rot, step.v, k_sep, v_sep, md, step.scale)

    q = step.q.clone()
    out = torch.full_like(q, float("nan"))
    kernel.forward(q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale, out=out,
                   positions=positions, cos_sin_cache=cos_sin)
    assert torch.equal(q, q_rot), "q is rotated in place"
    assert torch.equal(step.k_cache, k_sep) and torch.equal(step.v_cache, v_sep)
    assert torch.equal(out, want)

    ref_q, ref_k = ReferenceOps().rotary_embedding(positions, step.q.clone(), step.k.clone(),
                                                   cos_sin, head_size)
    ref_kc, ref_vc = step.ref_k_cache.clone(), step.ref_v_cache.clone()
    write_kv_cache(ref_k, step.v, ref_kc, ref_vc, step.batch.slot_mapping)
    ref = paged_attention(ref_q, ref_kc, ref_vc, step.batch.query_start_loc, step.batch.seq_lens,
                          step.batch.block_tables, step.scale)
    if dtype == BF16 and not ON_GPU:  # the interpreter's bf16 rounding (test_triton_rotary_cache)
        torch.testing.assert_close(out, ref, atol=6e-2, rtol=3e-2)
    else:
        assert_matches(out, ref, dtype)


# ---------------------------------------------------------------------------------------------
# Split-KV decode
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_splits,min_partition,window",
                         [(16, 0, None), (8, 128, None), (16, 0, 40)])
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_decode_many_splits_with_empty_ones(num_splits, min_partition, window, dtype):
    big = 7 if ON_GPU else 1
    ctx = [0, 4, 16, 63, 129 * big, 300 * big]  # seq_len 1 uses one split; the rest vary
    cfg = dict(group=4, head_size=64, block_size=16, dtype=dtype)
    step = make_step([1] * len(ctx), ctx, **cfg, window=window,
                     seed=_seed("splits", num_splits, min_partition, window, dtype))
    b = step.batch
    reshape_and_cache(step.k, step.v, step.k_cache, step.v_cache, b.slot_mapping)
    numel = decode_workspace_numel(b.num_seqs, step.q.shape[1], num_splits, 64)
    workspace = torch.full((numel + 123,), float("nan"), device=DEVICE)
    out = torch.full_like(step.q, float("nan"))
    decode_attention(step.q, step.k_cache, step.v_cache, out, b.query_start_loc, b.seq_lens,
                     b.block_tables, step.scale, num_seqs=b.num_seqs, num_splits=num_splits,
                     workspace=workspace, sliding_window=window, min_partition=min_partition)
    assert not torch.isnan(workspace[:numel]).any(), "a split left its workspace unwritten"
    assert_matches(out, step.ref_out, dtype)


@pytest.mark.parametrize("num_splits,fused_reduce", [(4, False), (4, True), (1, True)])
def test_decode_of_empty_sequence_is_zero_not_nan(num_splits, fused_reduce):
    """Graph padding may hand the kernel sequences of length 0: their output must be finite."""
    cfg = dict(group=4, head_size=64, block_size=16, dtype=F32)
    step = make_step([1, 1], [20, 5], **cfg, seed=_seed("empty"))
    b = step.batch
    seq_lens = b.seq_lens.clone()
    seq_lens[1] = 0
    workspace = torch.full((decode_workspace_numel(2, step.q.shape[1], num_splits, 64),),
                           float("nan"), device=DEVICE)
    out = torch.full_like(step.q, float("nan"))
    reshape_and_cache(step.k, step.v, step.k_cache, step.v_cache, b.slot_mapping)
    decode_attention(step.q, step.k_cache, step.v_cache, out, b.query_start_loc, seq_lens,
                     b.block_tables, step.scale, num_seqs=2, num_splits=num_splits,
                     workspace=workspace, min_partition=0, fused_reduce=fused_reduce)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_matches(out[:1], step.ref_out[:1], F32)


@pytest.mark.parametrize("num_splits,window,dtype", [(1, None, F32), (1, 40, BF16), (8, None, F32)])
def test_decode_fused_reduce_matches_two_kernels(num_splits, window, dtype):
    """With ``fused_reduce`` one split writes the output directly (its workspace untouched) and
    more splits reduce in the second kernel: the same result as always reducing separately. Two
    layers of one step, run for two steps, share the workspace."""
    big = 7 if ON_GPU else 1
    ctx = [0, 47, 130 * big] + ([5, 16, 77 * big] if ON_GPU else [])  # mostly partial blocks
    cfg = dict(group=4, head_size=64, block_size=16, dtype=dtype)
    layers = [make_step([1] * len(ctx), ctx, **cfg, window=window,
                        seed=_seed("fused-reduce", num_splits, window, dtype, layer))
              for layer in range(2)]
    num_seqs, num_heads = len(ctx), layers[0].q.shape[1]
    numel = decode_workspace_numel(num_seqs, num_heads, num_splits, 64)
    workspace = torch.full((numel,), float("nan"), device=DEVICE)

    def run(step, out, **kw):
        b = step.batch
        decode_attention(step.q, step.k_cache, step.v_cache, out, b.query_start_loc, b.seq_lens,
                         b.block_tables, step.scale, num_seqs=num_seqs, num_splits=num_splits,
                         sliding_window=window, min_partition=0, **kw)
        return out

    two_kernels = []
    for step in layers:
        reshape_and_cache(step.k, step.v, step.k_cache, step.v_cache, step.batch.slot_mapping)
        two_kernels.append(run(step, torch.full_like(step.q, float("nan")), fused_reduce=False,
                               workspace=torch.full_like(workspace, float("nan"))))
    for _ in range(2):
        for step, two in zip(layers, two_kernels):
            one = run(step, torch.full_like(step.q, float("nan")), workspace=workspace)
            if num_splits == 1:
                assert torch.isnan(workspace).all(), "one split writes the output directly"
            assert_matches(one, step.ref_out, dtype)
            torch.testing.assert_close(one, two, **(_tol(dtype) if dtype != F32
                                                    else dict(atol=1e-6, rtol=1e-5)))


# Verify steps (speculative decoding): q query tokens per sequence over a cached context, the
# split-KV kernel with q x group rows per program (``TritonAttentionKernel.verify_query_len``).
@pytest.mark.parametrize("q,group,window,dtype", [(4, 4, None, BF16), (3, 8, 24, F32), (8, 1, None, F16)])
def test_verify_step_takes_split_kv_and_matches_reference(q, group, window, dtype):
    big = 7 if ON_GPU else 1
    ctx = [0, 5, 63, 130 * big]  # 0: a q-token prompt with no context
    cfg = dict(group=group, head_size=64, block_size=16, dtype=dtype)
    step = make_step([q] * len(ctx), ctx, **cfg, window=window, seed=_seed("verify", q, group, window))
    spec = AttentionSpec(num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS, head_size=64,
                         dtype=dtype, block_size=16, sliding_window=window)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=64)
    assert kernel.build_metadata(step.batch).query_len == 1  # eager (host lists): prefill kernel
    graph_batch = dataclasses.replace(step.batch, query_start_loc_host=[], seq_lens_host=[])
    md = kernel.build_metadata(graph_batch)  # as a captured verify step hands it over
    assert (md.num_decodes, md.num_prefills, md.query_len) == (len(ctx), 0, q)
    for splits in {md.num_splits, 1}:  # reduced in a second kernel, and written directly
        md.num_splits = splits
        out = torch.full_like(step.q, float("nan"))
        kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale, out=out)
        assert_matches(out, step.ref_out, dtype)


def test_only_uniform_short_verify_steps_take_split_kv():
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=F32, block_size=16)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=64)

    def batch(query_lens, num_decodes=0, host=False):  # host lists: an eager step
        n = sum(query_lens)
        return AttentionBatch(n, len(query_lens), num_decodes, None, None, None, None, max(query_lens),
                              4096, [0, n] if host else [], [n] if host else [])

    assert kernel.verify_query_len(batch([4, 4, 4])) == 4
    assert kernel.verify_query_len(batch([4, 4, 4], host=True)) == 0  # eager: prefill kernel
    assert kernel.verify_query_len(batch([4, 3, 4])) == 0  # mixed: prefill kernel
    assert kernel.verify_query_len(batch([1, 1], num_decodes=2)) == 0  # decodes
    assert kernel.verify_query_len(batch([16])) == 16 and kernel.verify_query_len(batch([17])) == 0
    assert kernel.verify_query_len(batch([8] * 9)) == 0  # more rows than the workspace holds


def test_num_splits_depends_on_batch_size_only():
    spec = AttentionSpec(num_heads=32, num_kv_heads=8, head_size=128, dtype=BF16, block_size=16)
    kernel = TritonAttentionKernel(spec, max_model_len=8192, max_num_seqs=256)
    splits = [kernel.num_splits(n) for n in range(1, 257)]
    assert all(s >= 1 and s & (s - 1) == 0 for s in splits)
    assert splits == sorted(splits, reverse=True)  # more sequences, fewer splits
    assert splits[0] > 1 and splits[-1] == 1


@pytest.mark.skipif(not ON_GPU, reason="CUDA graphs need a GPU")
def test_decode_replays_in_a_cuda_graph():
    """Capture one decode step, then change lengths, tables and inputs in place and replay."""
    cfg = dict(group=4, head_size=128, block_size=16, dtype=BF16)
    spec = AttentionSpec(num_heads=4 * NUM_KV_HEADS, num_kv_heads=NUM_KV_HEADS, head_size=128,
                         dtype=BF16, block_size=16)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=8)
    first = make_step([1] * 6, [5, 100, 900, 33, 2000, 0], **cfg, seed=1)
    second = make_step([1] * 6, [1500, 3, 64, 700, 17, 260], **cfg, seed=2)
    num_blocks = max(first.k_cache.shape[0], second.k_cache.shape[0])
    width = max(first.batch.block_tables.shape[1], second.batch.block_tables.shape[1])
    k_cache = torch.empty(num_blocks, 16, NUM_KV_HEADS, 128, dtype=BF16, device=DEVICE)
    v_cache = torch.empty_like(k_cache)
    bufs = {name: getattr(first, name).clone() for name in ("q", "k", "v")}
    seq_lens = first.batch.seq_lens.clone()
    qsl = first.batch.query_start_loc.clone()
    slots = first.batch.slot_mapping.clone()
    tables = torch.zeros(6, width, dtype=torch.int32, device=DEVICE)

    def load(step):
        k_cache[:step.k_cache.shape[0]].copy_(step.k_cache)
        v_cache[:step.v_cache.shape[0]].copy_(step.v_cache)
        for name in bufs:
            bufs[name].copy_(getattr(step, name))
        seq_lens.copy_(step.batch.seq_lens)
        slots.copy_(step.batch.slot_mapping)
        tables.zero_()
        tables[:, :step.batch.block_tables.shape[1]].copy_(step.batch.block_tables)

    load(first)
    batch = AttentionBatch(6, 6, 6, qsl, seq_lens, tables, slots, 1, 4096, [], [])
    md = kernel.build_metadata(batch)
    kernel.forward(bufs["q"], bufs["k"], bufs["v"], k_cache, v_cache, md, first.scale)  # warm-up
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernel.forward(bufs["q"], bufs["k"], bufs["v"], k_cache, v_cache, md, first.scale)
    for step in (second, first, second):
        load(step)
        out.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        assert_matches(out, step.ref_out, BF16)
    assert md.num_splits > 1
