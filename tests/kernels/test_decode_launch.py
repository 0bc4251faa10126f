"""The split-KV decode kernel's launch shapes (``tessellm/kernels/attention/decode_table.py``):
every shape the table names, the head-major grid and the "kdot" e4m3 widening (on a GPU) give the
reference's output on 16-bit and fp8 caches; the table lookup picks the largest batch key at or under the batch.

On the CPU (Triton's interpreter) the stage count changes nothing but BLOCK_N, warps and the grid
order do; on a GPU a batch of 256 decodes also goes through ``TritonAttentionKernel.forward``,
which takes the table's entry there.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.attention import paged_attention  # noqa: E402
from tessellm.backends.spec import AttentionBatch, AttentionSpec  # noqa: E402
from tessellm.kernels.attention import (  # noqa: E402
    TritonAttentionKernel,
    decode_attention,
    decode_workspace_numel,
)
from tessellm.kernels.attention.decode_table import DECODE_TABLE, lookup  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
FP8 = torch.float8_e4m3fn
KVH, HEAD, BS = (8, 128, 16) if ON_GPU else (2, 64, 16)
# every (BLOCK_N, warps, stages, head_major, fp8_convert) the table names, and a spread of others
SHAPES = sorted({(*v[:4], v[5] if len(v) > 5 else "auto") for v in DECODE_TABLE.values()}
                | {(64, 4, 3, True, "auto"), (32, 2, 5, False, "auto"), (16, 2, 7, True, "auto"),
                   (64, 2, 5, False, "kdot")})


def _decodes(num_seqs, max_ctx, cache_dtype, seed):
    g = torch.Generator().manual_seed(seed)
    seq_lens = torch.randint(1, max_ctx + 1, (num_seqs,), generator=g)
    seq_lens[0] = 1  # only the new key
    nblk = (seq_lens + BS - 1) // BS
    pool = torch.randperm(int(nblk.sum()) + 2, generator=g)
    tables = torch.zeros(num_seqs, int(nblk.max()), dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblk.tolist()):
        tables[s, :n] = pool[used:used + n]
        used += n
    shape = (len(pool), BS, KVH, HEAD)
    k_cache = (torch.randn(shape, generator=g) * 2).to(cache_dtype).to(DEV)
    v_cache = torch.randn(shape, generator=g).to(cache_dtype).to(DEV)
    q = torch.randn(num_seqs, 4 * KVH, HEAD, generator=g).to(torch.bfloat16).to(DEV)
    qsl = torch.arange(num_seqs + 1, dtype=torch.int32, device=DEV)
    return q, k_cache, v_cache, qsl, seq_lens.to(torch.int32).to(DEV), tables.to(DEV)


def _reference(q, k_cache, v_cache, qsl, seq_lens, tables):
    return paged_attention(q.float(), k_cache.float(), v_cache.float(), qsl, seq_lens, tables,
                           HEAD ** -0.5, None)


def _rel(out, ref):
    assert not torch.isnan(out).any(), "some output rows were never written"
    return ((out.float() - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, FP8])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("num_splits", [1, 2])
def test_decode_launch_shape_matches_reference(cache_dtype, shape, num_splits):
    num_seqs, max_ctx = (40, 700) if ON_GPU else (3, 70)
    q, kc, vc, qsl, seq_lens, tables = _decodes(num_seqs, max_ctx, cache_dtype,
                                                seed=hash((shape, num_splits)) % 1000)
    ws = torch.full((decode_workspace_numel(num_seqs, q.shape[1], num_splits, HEAD),),
                    float("nan"), device=DEV)
    out = torch.full_like(q, float("nan"))
    decode_attention(q, kc, vc, out, qsl, seq_lens, tables, HEAD ** -0.5, num_seqs=num_seqs,
                     num_splits=num_splits, workspace=ws, min_partition=0, tiles=shape[:3],
                     head_major=shape[3], fp8_convert=shape[4])
    assert _rel(out, _reference(q, kc, vc, qsl, seq_lens, tables)) < 1.5e-2


def test_lookup_takes_the_largest_batch_key_at_or_under_the_batch():
    table = {("fp8", 128): (32, 2, 5, True, 0), ("fp8", 256): (64, 2, 5, False, 2),
             ("bfloat16", 64): (64, 4, 3, False, 0)}
    assert lookup("fp8", 127, table) is None
    assert lookup("fp8", 128, table) == table[("fp8", 128)]
    assert lookup("fp8", 255, table) == table[("fp8", 128)]
    assert lookup("fp8", 4096, table) == table[("fp8", 256)]
    assert lookup("float16", 256, table) is None
    assert lookup("bfloat16", 64, table) == table[("bfloat16", 64)]


@pytest.mark.skipif(not ON_GPU, reason="the table applies to CUDA launches")
@pytest.mark.parametrize("kv_cache_dtype", ["auto", "fp8"])
def test_forward_at_batch_256_takes_the_table_and_matches_reference(kv_cache_dtype):
    cache_dtype = FP8 if kv_cache_dtype == "fp8" else torch.bfloat16
    q, kc, vc, qsl, seq_lens, tables = _decodes(256, 768, cache_dtype, seed=7)
    spec = AttentionSpec(num_heads=4 * KVH, num_kv_heads=KVH, head_size=HEAD,
                         dtype=torch.bfloat16, block_size=BS, kv_cache_dtype=kv_cache_dtype)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=256)
    slots = torch.full((256,), -1, dtype=torch.int64, device=DEV)  # keep the cache as drawn
    batch = AttentionBatch(256, 256, 256, qsl, seq_lens, tables, slots, 1, 769, [], [])
    k = torch.zeros(256, KVH, HEAD, dtype=torch.bfloat16, device=DEV)
    out = kernel.forward(q, k, torch.zeros_like(k), kc, vc, kernel.build_metadata(batch),
                         HEAD ** -0.5)
    entry = lookup("fp8" if kv_cache_dtype == "fp8" else "bfloat16", 256)
    if entry is not None and entry[4]:
        assert kernel.num_splits(256) == entry[4]
    assert _rel(out, _reference(q, kc, vc, qsl, seq_lens, tables)) < 1.5e-2
