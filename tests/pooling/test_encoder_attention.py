"""Bidirectional attention as encoders get it (``pooling/encoder.py``): key limits at each
sequence's last key give full attention over the sequence, i.e. torch's non-causal
scaled-dot-product attention per sequence, in the pure-torch reference (the conformance
oracle), the cpu backend's kernel and the Triton kernel (the interpreter on the CPU); the
runner's limits for a step, and its refusal of a step that splits an encoder prompt."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tessellm.backends.spec import AttentionSpec
from tessellm.pooling.encoder import encoder_key_limits
from tessellm.testing.harness import make_paged_step

Q_LENS = [9, 70, 1, 33]  # whole sequences, no cached context
KVH, GROUP, HEAD, BS = 2, 2, 32, 16


def _step():
    limits = encoder_key_limits([SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=n,
                                                 request_id=str(i)) for i, n in enumerate(Q_LENS)], Q_LENS)
    return make_paged_step(Q_LENS, [0] * len(Q_LENS), num_kv_heads=KVH, group=GROUP, head_size=HEAD,
                           block_size=BS, dtype=torch.float32, device=torch.device("cpu"), seed=5,
                           key_limits=limits.tolist())


def _sdpa(step) -> torch.Tensor:
    """Per sequence, torch's non-causal SDPA over its own q, k, v."""
    out, start = [], 0
    for n in Q_LENS:
        q = step.q[start:start + n].transpose(0, 1)
        k = step.k[start:start + n].repeat_interleave(GROUP, 1).transpose(0, 1)
        v = step.v[start:start + n].repeat_interleave(GROUP, 1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q, k, v, is_causal=False).transpose(0, 1))
        start += n
    return torch.cat(out)


def _spec():
    return AttentionSpec(num_heads=KVH * GROUP, num_kv_heads=KVH, head_size=HEAD, dtype=torch.float32,
                         block_size=BS, prefill_key_limits=True, max_model_len=256, max_num_seqs=8)


def test_limits_at_the_last_key_are_full_attention_in_the_reference():
    step = _step()
    torch.testing.assert_close(step.ref_out, _sdpa(step), atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["cpu", pytest.param("triton", marks=pytest.mark.interpreted)])
def test_backend_kernels_attend_both_ways(kernel):
    if kernel == "cpu":
        from tessellm.backends.cpu.attention import CpuAttentionKernel

        impl = CpuAttentionKernel(_spec())
    else:
        pytest.importorskip("triton")
        from tessellm.kernels.attention import TritonAttentionKernel

        impl = TritonAttentionKernel(_spec(), max_model_len=256, max_num_seqs=8)
    step = _step()
    got = impl.forward(step.q, step.k, step.v, step.k_cache, step.v_cache,
                       impl.build_metadata(step.batch), step.scale)
    torch.testing.assert_close(got, _sdpa(step), atol=1e-5, rtol=0)


def test_runner_limits_and_split_prompt_refused():
    states = [SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=n, request_id=str(i))
              for i, n in enumerate([3, 2, 1])]
    assert encoder_key_limits(states, [3, 2, 1]).tolist() == [2, 2, 2, 1, 1, 0]
    split = [SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=5, request_id="r")]
    with pytest.raises(RuntimeError, match="tokens 0..2 of encoder request r's 5; bidirectional"):
        encoder_key_limits(split, [3])
    assert encoder_key_limits([], []).dtype == np.int32


@pytest.mark.parametrize("kernel", ["reference", "cpu",
                                    pytest.param("triton", marks=pytest.mark.interpreted)])
def test_symmetric_window_is_a_band(kernel):
    """ModernBERT's local layers (``layers/symmetric_window.py``): window half + 1 and limits cut
    to position + half give the band |q - k| <= half of torch's SDPA."""
    from tessellm.layers.symmetric_window import windowed_batch

    half = 5
    limits = encoder_key_limits([SimpleNamespace(num_computed_tokens=0, num_prompt_tokens=n, request_id=str(i))
                                 for i, n in enumerate(Q_LENS)], Q_LENS)
    step = make_paged_step(Q_LENS, [0] * len(Q_LENS), num_kv_heads=KVH, group=GROUP, head_size=HEAD,
                           block_size=BS, dtype=torch.float32, device=torch.device("cpu"), seed=6,
                           window=half + 1, key_limits=limits.tolist())
    batch = windowed_batch(step.batch, half)
    assert batch.key_limits_host[:9] == [5, 6, 7, 8, 8, 8, 8, 8, 8]  # the first sequence's 9 rows
    spec = AttentionSpec(num_heads=KVH * GROUP, num_kv_heads=KVH, head_size=HEAD, dtype=torch.float32,
                         block_size=BS, sliding_window=half + 1, prefill_key_limits=True,
                         max_model_len=256, max_num_seqs=8)
    if kernel == "reference":
        from tessellm.backends.reference.attention import ReferenceAttentionKernel

        impl = ReferenceAttentionKernel(sliding_window=half + 1)
    elif kernel == "cpu":
        from tessellm.backends.cpu.attention import CpuAttentionKernel

        impl = CpuAttentionKernel(spec)
    else:
        pytest.importorskip("triton")
        from tessellm.kernels.attention import TritonAttentionKernel

        impl = TritonAttentionKernel(spec, max_model_len=256, max_num_seqs=8)
    got = impl.forward(step.q, step.k, step.v, step.k_cache, step.v_cache, impl.build_metadata(batch), step.scale)
    out, start = [], 0
    for n in Q_LENS:
        pos = torch.arange(n)
        band = (pos[:, None] - pos[None, :]).abs() <= half
        q = step.q[start:start + n].transpose(0, 1)
        k = step.k[start:start + n].repeat_interleave(GROUP, 1).transpose(0, 1)
        v = step.v[start:start + n].repeat_interleave(GROUP, 1).transpose(0, 1)
        out.append(F.scaled_dot_product_attention(q, k, v, attn_mask=band).transpose(0, 1))
        start += n
    torch.testing.assert_close(got, torch.cat(out), atol=1e-5, rtol=0)


def test_encoder_refused_on_a_kernel_without_key_limits():
    """A kernel that does not declare supports_key_limits would attend causally: refused at
    load, by name (``model_loader.check_key_limits``)."""
    from tessellm.backends.registry import get_registry
    from tessellm.loader.model_loader import check_key_limits

    registry = get_registry()
    old = SimpleNamespace(name="old")  # a plugin kernel of API 7
    with pytest.raises(ValueError, match=r"an encoder's tokens to the whole prompt.*backend 'cpu' cannot do"):
        check_key_limits(registry, registry.backends["cpu"], old, _spec())
