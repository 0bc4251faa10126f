"""Key limits (``AttentionBatch.key_limits``, Gemma 3's images) in the Triton prefill kernel,
against the pure-torch reference (``backends/reference/attention.paged_attention``'s
``key_limits``): an image's rows see the image's later keys, the tile's key range grows to its
rows' largest limit, the sliding window stays relative to each row's position. Images that
cross the kernel's query tiles and KV blocks, two images in a chunk, a chunk over cached
context next to decodes; float32 and bfloat16 (whose tiles are larger). GPU at these sizes
too, or Triton's interpreter on the CPU (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from tessellm.backends.reference.attention import paged_attention  # noqa: E402
from tessellm.backends.spec import AttentionSpec  # noqa: E402
from tessellm.kernels.attention import TritonAttentionKernel  # noqa: E402
from tessellm.testing.conformance.test_attention import image_key_limits  # noqa: E402
from tessellm.testing.harness import make_paged_step, tolerance  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
KVH, GROUP, HEAD, BS = 2, 2, 32, 8

# (query_lens, ctx_lens, image spans per sequence as (first, last) query rows)
CASES = {
    "one-image-chunk": ([21], [0], [[(0, 20)]]),
    "crosses-tiles": ([1, 40], [9, 5], [[], [(3, 37)]]),
    "two-images": ([1, 1, 30], [4, 17, 2], [[], [], [(1, 7), (12, 29)]]),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("case", list(CASES))
def test_prefill_key_limits_match_reference(case, window, dtype):
    q_lens, ctx, spans = CASES[case]
    limits = image_key_limits(q_lens, ctx, spans)
    step = make_paged_step(q_lens, ctx, num_kv_heads=KVH, group=GROUP, head_size=HEAD,
                           block_size=BS, dtype=dtype, device=DEVICE, window=window,
                           seed=len(case), key_limits=limits)
    spec = AttentionSpec(num_heads=KVH * GROUP, num_kv_heads=KVH, head_size=HEAD, dtype=dtype,
                         block_size=BS, sliding_window=window, prefill_key_limits=True)
    kernel = TritonAttentionKernel(spec, max_model_len=256, max_num_seqs=16)
    got = kernel.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                         kernel.build_metadata(step.batch), step.scale)
    torch.testing.assert_close(got.float().cpu(), step.ref_out.float(), **tolerance(dtype))
    # The case could fail: the causal result is far from it on the image rows.
    b = step.batch
    causal = paged_attention(step.q.float().cpu(), step.ref_k_cache.float(),
                             step.ref_v_cache.float(), b.query_start_loc.cpu(), b.seq_lens.cpu(),
                             b.block_tables.cpu(), step.scale, window)
    assert (causal - step.ref_out.float()).abs().max() > 0.1
