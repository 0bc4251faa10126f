"""Multi-head latent attention (``AttentionSpec.mla_value_size``, DeepSeek-V2/V3) against the
pure-torch oracle (``backends/reference/mla_attention.py``): one cached latent row per token,
values its first ``mla_value_size`` dims, no value cache. A backend whose kernel does not
declare ``supports_mla`` is skipped (the engine refuses MLA models on it), unless its
capabilities claim ``mla``. fp8 latent rows (``kv_cache_dtype='fp8'``) run where the MLA kernel
lists fp8 in ``kv_cache_dtypes``: the cache bytes equal the oracle's quantization of the rows
(``row / k_scale`` to e4m3) and the output the oracle's over those same rounded rows."""

from __future__ import annotations

import pytest
import torch

from tessellm.backends.reference.mla_attention import (paged_mla_attention, quantize_latent,
                                                       write_latent_cache)
from tessellm.backends.spec import AttentionSpec
from tessellm.testing.conformance.test_attention import BATCHES
from tessellm.testing.harness import make_paged_step, seed_of, tolerance

# (heads, latent row D, value width Dv, block size); the last is the released models' 576 / 512
SHAPES = [(8, 48, 32, 16), (4, 40, 32, 8), (2, 576, 512, 16)]


@pytest.mark.parametrize("batch", list(BATCHES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "h{}-d{}-dv{}-bs{}".format(*s))
def test_mla_attention_matches_reference(target, shape, batch):
    _check_mla(target, shape, batch, torch.float32)


@pytest.mark.parametrize("batch", ["decode", "mixed"])
def test_mla_attention_low_precision(target, batch):
    _check_mla(target, (16, 576, 512, 16), batch, target.low_precision_dtype)


@pytest.mark.parametrize("batch", ["decode", "mixed", "verify"])
@pytest.mark.parametrize("shape", [SHAPES[0], SHAPES[2]], ids=lambda s: "h{}-d{}-dv{}-bs{}".format(*s))
def test_mla_attention_fp8_latent_rows(target, shape, batch):
    _check_mla(target, shape, batch, torch.float32, kv_cache_dtype="fp8")


def _check_mla(target, shape, batch, dtype, kv_cache_dtype="auto"):
    heads, d, dv, block_size = shape
    spec = AttentionSpec(num_heads=heads, num_kv_heads=1, head_size=d, dtype=dtype,
                         block_size=block_size, max_model_len=256, max_num_seqs=8,
                         mla_value_size=dv, kv_cache_dtype=kv_cache_dtype)
    fp8 = kv_cache_dtype != "auto"
    if fp8 and not _declares_mla_fp8(target, spec):
        pytest.skip(f"{target.name}'s MLA kernel does not list fp8 in kv_cache_dtypes")
    try:
        kernel = target.registry.attention_kernel(target.backend, spec)
    except Exception:  # a kernel that does not know the field may refuse the latent width
        kernel = None
    if kernel is None or not getattr(kernel, "supports_mla", False):
        if target.backend.capabilities.get("mla"):
            pytest.fail(f"{target.name} declares mla but its kernel for an MLA spec does not "
                        "declare supports_mla")
        pytest.skip(f"{target.name} has no MLA attention kernel")
    q_lens, ctx = BATCHES[batch]
    step = make_paged_step(q_lens, ctx, num_kv_heads=1, group=heads, head_size=d,
                           block_size=block_size, dtype=dtype, device=target.device,
                           seed=seed_of("mla", shape, batch, str(dtype)))
    b = step.batch
    k_cache, ref_cache, k_scale = step.k_cache, step.ref_k_cache.float(), 1.0
    if fp8:  # the harness's context rows, stored as e4m3 values; this step's by the oracle
        k_scale = float(getattr(kernel, "k_scale", 1.0))
        context = quantize_latent(step.k_cache.cpu().float(), kernel.kv_cache_torch_dtype)
        k_cache, ref_cache = context.to(target.device, copy=True), context
        write_latent_cache(step.k.cpu(), ref_cache, b.slot_mapping.cpu(), k_scale)
    want = paged_mla_attention(step.q.cpu().float(), ref_cache, dv, b.query_start_loc.cpu(),
                               b.seq_lens.cpu(), b.block_tables.cpu(), step.scale, k_scale)
    md = kernel.build_metadata(b)
    out = kernel.forward(step.q, step.k, None, k_cache, None, md, step.scale)
    assert out.shape == (step.q.shape[0], heads, dv) and out.dtype == step.q.dtype
    torch.testing.assert_close(out.float().cpu(), want, **tolerance(dtype))
    # The latent rows land in exactly their slots (fp8: as the oracle rounds them); nothing
    # else changes.
    got = k_cache.cpu()
    assert torch.equal(got.view(torch.uint8) if fp8 else got,
                       ref_cache.view(torch.uint8) if fp8 else ref_cache), \
        "k_cache differs from reference"


def _declares_mla_fp8(target, spec) -> bool:
    try:
        kernel = target.registry.attention_kernel(target.backend, spec)
    except Exception:  # a kernel that refuses the dtype in its own words
        return False
    return (kernel is not None and getattr(kernel, "supports_mla", False)
            and "fp8" in getattr(kernel, "kv_cache_dtypes", ("auto",)))
