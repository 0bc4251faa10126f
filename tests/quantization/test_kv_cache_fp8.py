"""fp8 KV cache in the Triton attention kernels: per-tensor scales, written and read directly.

The oracle is the reference paged attention over the *dequantized* cache (``fp8 * scale``):
the kernel must write ``k / k_scale`` saturated to e4m3 and attend exactly as if the cache
held those dequantized values. A second check bounds the end-to-end fp8 error against a
full-precision cache.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.kernels.attention import TritonAttentionKernel  # noqa: E402
from tessellm.backends.reference.attention import paged_attention, write_kv_cache  # noqa: E402
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.backends.spec import AttentionBatch  # noqa: E402
from tests.gpu_set import GPU_WHEN_PRESENT  # noqa: E402

ON_GPU = torch.cuda.is_available()
DEV = torch.device("cuda" if ON_GPU else "cpu")
pytestmark = GPU_WHEN_PRESENT  # every test runs on DEV: in the GPU set where there is one
FP8 = torch.float8_e4m3fn
KVH, HEAD, BLOCK = 2, 64, 16
# decodes first, then prefill chunks (context already cached + this step's queries)
QUERY_LENS, CTX_LENS = ([1, 1, 1, 200, 37], [17, 300, 1023, 0, 411]) if ON_GPU else \
    ([1, 1, 9, 5], [17, 40, 0, 13])


def _step(dtype, group, k_scale, v_scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq_lens = [c + q for c, q in zip(CTX_LENS, QUERY_LENS)]
    nblocks = [-(-s // BLOCK) for s in seq_lens]
    pool = torch.randperm(sum(nblocks) + 2, generator=g)
    tables = torch.zeros(len(seq_lens), max(nblocks), dtype=torch.int32)
    used = 0
    for s, n in enumerate(nblocks):
        tables[s, :n] = pool[used:used + n]
        used += n
    shape = (len(pool), BLOCK, KVH, HEAD)
    # an existing context, as earlier steps would have written it
    k_cache = (torch.randn(shape, generator=g) * 2 / k_scale).clamp(-448, 448).to(FP8)
    v_cache = (torch.randn(shape, generator=g) / v_scale).clamp(-448, 448).to(FP8)
    slots = [int(tables[s, p // BLOCK]) * BLOCK + p % BLOCK
             for s in range(len(seq_lens)) for p in range(CTX_LENS[s], seq_lens[s])]
    t = len(slots)
    q = torch.randn(t, KVH * group, HEAD, generator=g).to(dtype)
    k = (torch.randn(t, KVH, HEAD, generator=g) * 2).to(dtype)
    v = torch.randn(t, KVH, HEAD, generator=g).to(dtype)
    qsl = [0]
    for n in QUERY_LENS:
        qsl.append(qsl[-1] + n)
    batch = AttentionBatch(
        num_tokens=t, num_seqs=len(seq_lens), num_decodes=sum(1 for n in QUERY_LENS if n == 1),
        query_start_loc=torch.tensor(qsl, dtype=torch.int32, device=DEV),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEV),
        block_tables=tables.to(DEV), slot_mapping=torch.tensor(slots, device=DEV),
        max_query_len=max(QUERY_LENS), max_seq_len=max(seq_lens),
        query_start_loc_host=qsl, seq_lens_host=seq_lens)
    return [x.to(DEV) for x in (q, k, v, k_cache, v_cache)], batch


def _kernel(dtype, group, kv_cache_dtype, k_scale=1.0, v_scale=1.0):
    spec = AttentionSpec(num_heads=KVH * group, num_kv_heads=KVH, head_size=HEAD, dtype=dtype,
                         block_size=BLOCK, kv_cache_dtype=kv_cache_dtype)
    kernel = TritonAttentionKernel(spec, max_model_len=4096, max_num_seqs=8)
    kernel.k_scale, kernel.v_scale = k_scale, v_scale
    return kernel


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16] + ([torch.float16] if ON_GPU else []))
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.05, 0.02)])
def test_fp8_cache_matches_reference_on_dequantized_cache(dtype, group, scales):
    k_scale, v_scale = scales
    (q, k, v, k_cache, v_cache), batch = _step(dtype, group, k_scale, v_scale)
    kernel = _kernel(dtype, group, "fp8", k_scale, v_scale)
    assert kernel.kv_cache_torch_dtype == FP8 and "fp8" in kernel.kv_cache_dtypes
    scale = HEAD ** -0.5
    out = kernel.forward(q, k, v, k_cache, v_cache, kernel.build_metadata(batch), scale)
    # what was written: k / k_scale in e4m3 (one fp8 step of rounding at most)
    written = k_cache.view(-1, KVH, HEAD)[batch.slot_mapping].float() * k_scale
    close = torch.isclose(written, k.float(), rtol=2**-4, atol=k_scale * 2**-9)
    # GPUs convert in hardware; the CPU interpreter halves values that round up to a power of 2
    assert close.float().mean() > (0.9999 if ON_GPU else 0.97)
    ref_k, ref_v = k_cache.float() * k_scale, v_cache.float() * v_scale
    ref = paged_attention(q.float(), ref_k, ref_v, batch.query_start_loc, batch.seq_lens,
                          batch.block_tables, scale, None)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < {torch.float32: 1e-4, torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype], rel


# On a GPU every way of widening e4m3 tiles (tessellm.kernels.attention.common._fp8_ptx) is checked; on the CPU
# the interpreter has only Triton's own conversion.
CONVERTS = ["auto", "triton", "cvt", "bits", "kdot", "native16"] if ON_GPU else ["auto"]


@pytest.mark.parametrize("dtype", [torch.bfloat16] + ([torch.float16] if ON_GPU else []))
@pytest.mark.parametrize("convert", CONVERTS)
def test_fp8_cache_every_tile_conversion(dtype, convert):
    k_scale, v_scale = 0.05, 0.02
    (q, k, v, k_cache, v_cache), batch = _step(dtype, 4, k_scale, v_scale, seed=3)
    kernel = _kernel(dtype, 4, "fp8", k_scale, v_scale)
    kernel.fp8_convert = convert
    scale = HEAD ** -0.5
    out = kernel.forward(q, k, v, k_cache, v_cache, kernel.build_metadata(batch), scale)
    ref = paged_attention(q.float(), k_cache.float() * k_scale, v_cache.float() * v_scale,
                          batch.query_start_loc, batch.seq_lens, batch.block_tables, scale, None)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < {torch.float16: 3e-3, torch.bfloat16: 1.5e-2}[dtype], rel


def test_fp8_cache_error_vs_full_precision_cache():
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    (q, k, v, k8, v8), batch = _step(dtype, 4, 1.0, 1.0, seed=1)
    k_full, v_full = k8.to(dtype), v8.to(dtype)  # the same context, unquantized
    scale = HEAD ** -0.5
    fp8 = _kernel(dtype, 4, "fp8")
    out8 = fp8.forward(q, k, v, k8, v8, fp8.build_metadata(batch), scale)
    full = _kernel(dtype, 4, "auto")
    out = full.forward(q, k, v, k_full, v_full, full.build_metadata(batch), scale)
    rel = ((out8.float() - out.float()).norm() / out.float().norm()).item()
    # only this step's k/v went through fp8 rounding (on the CPU, with the interpreter's
    # mis-rounded elements too)
    assert rel < (0.05 if ON_GPU else 0.12), rel


def test_fp8_cache_halves_bytes_per_token():
    auto, fp8 = _kernel(torch.bfloat16, 4, "auto"), _kernel(torch.bfloat16, 4, "fp8")
    assert auto.kv_cache_torch_dtype is None  # the model's dtype
    assert torch.empty(0, dtype=fp8.kv_cache_torch_dtype).element_size() * 2 == \
        torch.empty(0, dtype=torch.bfloat16).element_size()


def test_write_matches_torch_quantization():
    (q, k, v, k_cache, v_cache), batch = _step(torch.float32, 1, 0.5, 0.25, seed=2)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    write_kv_cache((k / 0.5).clamp(-448, 448), (v / 0.25).clamp(-448, 448), ref_k, ref_v,
                   batch.slot_mapping)
    kernel = _kernel(torch.float32, 1, "fp8", 0.5, 0.25)
    kernel.forward(q, k, v, k_cache, v_cache, kernel.build_metadata(batch), HEAD ** -0.5)
    same = (k_cache.float() == ref_k.float()).float().mean().item()
    # GPUs round exactly like torch; the CPU interpreter's own conversion differs on ties
    assert same > (0.999 if ON_GPU else 0.99), same
