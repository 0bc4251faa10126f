"""The split-KV decode kernel's small-batch paths (``TritonAttentionKernel.prefetch_max_decodes``,
``fuse_rotary_max_decodes``): the first K/V tile loaded before the PDL wait, and a pure-decode
step's rotary + cache write done inside the split kernel. Against the reference backend and
against the unfused kernels, fresh random inputs, outputs poisoned with NaN first.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.attention import paged_attention, write_kv_cache  # noqa: E402
from tessellm.backends.reference.ops import ReferenceOps  # noqa: E402
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel, decode_attention, decode_workspace_numel, reshape_and_cache)
from tests.kernels.test_triton_attention import (  # noqa: E402
    BF16, DEVICE, F32, NUM_KV_HEADS, ON_GPU, _positions, _seed, _tol, assert_matches, make_step)

BIG = 7 if ON_GPU else 1


def _cos_sin(max_pos: int, head_size: int) -> torch.Tensor:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_size, 2).float() / head_size))
    freqs = torch.arange(max_pos).float()[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)


@pytest.mark.parametrize("num_splits,min_partition,window,dtype",
                         [(8, 0, None, F32), (16, 64, None, BF16), (4, 16, 40, F32), (1, 0, None, BF16)])
def test_prefetched_first_tile_matches_reference(num_splits, min_partition, window, dtype):
    """``prefetch``: keys of earlier steps before the wait, this step's keys reloaded after it;
    decodes and a verify step (q = 3: its last 3 keys are this step's)."""
    cfg = dict(group=4, head_size=64, block_size=16, dtype=dtype)
    for q_len in (1, 3):
        ctx = [0, 5, 16, 63, 129 * BIG, 300 * BIG]
        step = make_step([q_len] * len(ctx), ctx, **cfg, window=window,
                         seed=_seed("prefetch", num_splits, min_partition, window, q_len))
        b = step.batch
        reshape_and_cache(step.k, step.v, step.k_cache, step.v_cache, b.slot_mapping)
        numel = decode_workspace_numel(len(ctx), step.q.shape[1], num_splits, 64, q_len)
        outs = []
        for prefetch in (False, True):
            out = torch.full_like(step.q, float("nan"))
            decode_attention(step.q, step.k_cache, step.v_cache, out, b.query_start_loc,
                             b.seq_lens, b.block_tables, step.scale, num_seqs=len(ctx),
                             num_splits=num_splits, sliding_window=window,
                             min_partition=min_partition, query_len=q_len, prefetch=prefetch,
                             workspace=torch.full((numel,), float("nan"), device=DEVICE))
            assert_matches(out, step.ref_out, dtype)
            outs.append(out)
        torch.testing.assert_close(outs[1], outs[0], atol=1e-6, rtol=1e-5)


# The widest split count 16 in the interpreter (32 on a GPU; ~45% of this file's time there):
# at these contexts (<= 100 keys, 64-key partitions) two splits hold keys either way, and the
# others are empty splits the reduce skips, as at 8.
@pytest.mark.parametrize("dtype,head_size,group,splits,window",
                         [(F32, 64, 4, 8, None), (BF16, 128, 8, 32 if ON_GPU else 16, None),
                          (F32, 64, 1, 1, None), (BF16, 64, 4, 4, 24)])
def test_decode_step_fuses_rotary_and_cache_write(dtype, head_size, group, splits, window):
    """A pure-decode step given unrotated q, k and positions: the split kernel rotates, writes
    the new keys (the same bits as ``rotary_and_cache``) and attends like rotating first; a
    padding row (slot -1, length 0) writes nothing and gives 0. q stays as it was."""
    ctx = [0, 17, 40 * BIG, 2, 100 * BIG]
    cfg = dict(group=group, head_size=head_size, block_size=16, dtype=dtype)
    step = make_step([1] * len(ctx), ctx, **cfg, window=window,
                     seed=_seed("decode-rotary", dtype, head_size, group, splits, window))
    b = step.batch
    b.seq_lens[3] = 0  # graph padding: no key, no write
    b.slot_mapping[3] = -1
    positions = _positions(step.batch)
    positions[3] = 0
    cos_sin = _cos_sin(int(b.max_seq_len) + 3, head_size)
    spec = AttentionSpec(num_heads=NUM_KV_HEADS * group, num_kv_heads=NUM_KV_HEADS,
                         head_size=head_size, dtype=dtype, block_size=16, sliding_window=window)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=16)
    md = kernel.build_metadata(b)
    md.num_splits = splits

    kernel.fuse_rotary_max_decodes = 0  # the two-launch path: rotary_and_cache, then decode
    k_two, v_two = step.k_cache.clone(), step.v_cache.clone()
    want = kernel.forward(step.q.clone(), step.k, step.v, k_two, v_two, md, step.scale,
                          positions=positions, cos_sin_cache=cos_sin)
    kernel.fuse_rotary_max_decodes = 16
    q = step.q.clone()
    out = torch.full_like(q, float("nan"))
    kernel.forward(q, step.k, step.v, step.k_cache, step.v_cache, md, step.scale, out=out,
                   positions=positions, cos_sin_cache=cos_sin)
    assert torch.equal(q, step.q), "the fused decode path leaves q in memory as it was"
    assert torch.equal(step.v_cache, v_two)
    # The same arithmetic as rotary_and_cache (bit-equal in the interpreter); compiled, the two
    # kernels' rotations may round differently (FMA contraction, narrowed 16-bit arithmetic).
    diff = (step.k_cache.float() - k_two.float()).abs()
    assert diff.max() <= (1e-6 if dtype == F32 else 2 ** -7) * k_two.float().abs().max(), \
        f"{int((diff > 0).sum())} cached key elements differ, by up to {diff.max().item():.3g}"
    if not ON_GPU:
        assert torch.equal(step.k_cache, k_two)
    assert torch.equal(out[3], torch.zeros_like(out[3]))
    torch.testing.assert_close(out, want, **_tol(dtype))

    live = [0, 1, 2, 4]
    ref_q, ref_k = ReferenceOps().rotary_embedding(positions, step.q.clone(), step.k.clone(),
                                                   cos_sin, head_size)
    ref_kc, ref_vc = step.k_cache.clone(), step.v_cache.clone()  # rotated keys already in place
    write_kv_cache(ref_k, step.v, ref_kc, ref_vc, b.slot_mapping)
    ref = paged_attention(ref_q, ref_kc, ref_vc, b.query_start_loc, b.seq_lens, b.block_tables,
                          step.scale, window)
    if dtype == BF16 and not ON_GPU:  # the interpreter's bf16 rounding (test_triton_rotary_cache)
        torch.testing.assert_close(out[live], ref[live], atol=6e-2, rtol=3e-2)
    else:
        assert_matches(out[live], ref[live], dtype)


def test_fused_rotary_only_for_small_pure_decode_steps():
    spec = AttentionSpec(num_heads=8, num_kv_heads=2, head_size=64, dtype=BF16, block_size=16)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=64)
    q = torch.empty(4, 8, 64)
    cos_sin = torch.empty(10, 64)
    cache = torch.empty(1, 16, 2, 64, dtype=BF16)

    def md(num_decodes, num_prefills=0, query_len=1):
        return type("MD", (), dict(num_decodes=num_decodes, num_prefills=num_prefills,
                                   query_len=query_len))()

    assert kernel._fuses_decode_rotary(q, cache, md(4), cos_sin)
    assert not kernel._fuses_decode_rotary(q, cache, md(3, 1), cos_sin)  # a prefill chunk too
    assert not kernel._fuses_decode_rotary(q, cache, md(4, 0, 2), cos_sin)  # a verify step
    assert not kernel._fuses_decode_rotary(q, cache.to(torch.float8_e4m3fn), md(4), cos_sin)
    assert not kernel._fuses_decode_rotary(torch.empty(32, 8, 64), cache, md(32),
                                           cos_sin)  # above fuse_rotary_max_decodes
